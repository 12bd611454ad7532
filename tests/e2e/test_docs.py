"""The README's promises: its configuration reference is current and its request example works."""

from __future__ import annotations

import asyncio
import re
import sys

from sluice.server.app import SluiceServer
from sluice.server.reference import BEGIN, END, render
from support import ROOT

README = (ROOT / "README.md").read_text(encoding="utf-8")


def test_configuration_reference_is_current() -> None:
    start, end = README.index(BEGIN), README.index(END) + len(END)
    assert README[start:end] == render(), "run `python -m sluice.server.reference --write README.md`"


async def test_readme_python_example_prints_the_predicted_digit(server: SluiceServer) -> None:
    (snippet,) = re.findall(r"```python\n(.*?)```", README, flags=re.S)
    code = snippet.replace("127.0.0.1:8001", server.address)
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", code, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await proc.communicate()
    assert proc.returncode == 0, err.decode()
    assert out.decode().strip() == "predicted 0, true 0"
