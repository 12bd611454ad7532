"""Putting a Python model into a model repository from code: VESSL's `register_model`, for Sluice.

    from sluice.server.registration import register

    register("models", "iris", runner=IrisRunner, model=clf, requirements=["scikit-learn>=1.4"],
             inputs=[{"name": "features", "datatype": "FP64", "shape": [-1, 4]}],
             outputs=[{"name": "label", "datatype": "INT64", "shape": [-1]}])

writes the model's next version directory for the `python` runtime:

    models/iris/config.toml         runtime = "python" (only when the model has no config yet)
    models/iris/3/model.py          the runner's class, with the imports and definitions of its file
    models/iris/3/model.pkl         the model, pickled; or props.json: what the runner's save_model returned
    models/iris/3/artifacts/...     the artifacts, at their relative paths
    models/iris/3/requirements.txt  checked when the version loads

The version is built in a hidden directory of the repository and renamed into place in one step, so a
server polling the repository (`model_control = "poll"`) never sees half a version, and picks it up on its
next scan without a restart. An existing version is never overwritten.
"""

from __future__ import annotations

import ast
import inspect
import json
import os
import pickle
import pprint
import shutil
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from packaging.requirements import InvalidRequirement, Requirement

__all__ = ["register", "runner_source"]

_KEPT = (ast.Import, ast.ImportFrom, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)

_CONFIG = """\
# Written by sluice.server.registration: a python model whose versions each hold their own runner class
# (model.py), model and artifacts. Edit freely; later registrations leave this file as it is.
runtime = "python"
"""


def register(
    repository: str | os.PathLike[str],
    name: str,
    *,
    runner: type[Any],
    model: Any = None,
    artifacts: Iterable[str | os.PathLike[str]] = (),
    requirements: Iterable[str] = (),
    inputs: Sequence[Mapping[str, Any]] | None = None,
    outputs: Sequence[Mapping[str, Any]] | None = None,
    version: int | None = None,
) -> Path:
    """Writes version `version` (by default the next one) of model `name` and returns its directory.

    `runner` is a class the `python` runtime serves (VESSL's or Ventu's shape, or Sluice's own
    load/predict); `model` is saved by the runner's `save_model(model) -> props` when it has one (props.json),
    else pickled (model.pkl). `artifacts` are files or directories, copied under `artifacts/` with their
    paths relative to the current directory (absolute ones by their name). `inputs` and `outputs`
    (`{name, datatype, shape}` tables) are the signature, unless the runner declares its own.
    FileExistsError if that version exists; ValueError for a malformed argument, before anything is written.
    """
    root = Path(repository)
    if not root.is_dir():
        raise ValueError(f"repository {str(root)!r} is not a directory")
    if not name or name.startswith((".", "_")) or "/" in name or "\\" in name:
        raise ValueError(f"model name {name!r}: expected a directory name not starting with '.' or '_'")
    if version is not None and (not isinstance(version, int) or version < 1):
        raise ValueError(f"version must be an integer >= 1, got {version!r}")
    wanted = [_requirement(line) for line in requirements]
    code = runner_source(runner, inputs, outputs)
    saved = _saved_model(runner, model)  # first: save_model may write the files listed as artifacts
    sources = [_artifact(path) for path in artifacts]
    model_dir = root / name
    if version is not None and (model_dir / str(version)).exists():
        raise FileExistsError(f"{model_dir / str(version)} exists; a version is never overwritten")
    stage = Path(tempfile.mkdtemp(prefix=".sluice-register-", dir=root))  # hidden: servers skip it
    try:
        built = stage / "version"
        built.mkdir()
        (built / "model.py").write_text(code, encoding="utf-8")
        if wanted:
            (built / "requirements.txt").write_text("".join(f"{r}\n" for r in wanted), encoding="utf-8")
        if saved is not None:
            (built / saved[0]).write_bytes(saved[1])
        for source, relative in sources:
            target = built / "artifacts" / relative
            target.parent.mkdir(parents=True, exist_ok=True)
            if source.is_dir():
                shutil.copytree(source, target)
            else:
                shutil.copy2(source, target)
        if not model_dir.exists():
            fresh = stage / name
            fresh.mkdir()
            (fresh / "config.toml").write_text(_CONFIG, encoding="utf-8")
            number = version or 1
            built.rename(fresh / str(number))
            try:
                fresh.rename(model_dir)  # the whole model appears at once: config and first version
                return model_dir / str(number)
            except OSError:
                (fresh / str(number)).rename(built)  # another registration made the model meanwhile
        return _place(built, model_dir, version)
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def _place(built: Path, model_dir: Path, version: int | None) -> Path:
    """Renames the built version into place as `version`, or as the next free number."""
    for _ in range(100):  # bounded: only concurrent registrations of the same model take numbers meanwhile
        number = version or 1 + max((int(p.name) for p in model_dir.iterdir() if p.name.isdigit()), default=0)
        target = model_dir / str(number)
        if target.exists():
            if version is not None:
                raise FileExistsError(f"{target} exists; a version is never overwritten")
            continue
        try:
            built.rename(target)
        except OSError:
            if version is not None:
                raise FileExistsError(f"{target} exists; a version is never overwritten") from None
            continue
        return target
    raise FileExistsError(f"{model_dir}: no free version number after 100 tries")


def runner_source(
    runner: type[Any],
    inputs: Sequence[Mapping[str, Any]] | None = None,
    outputs: Sequence[Mapping[str, Any]] | None = None,
) -> str:
    """model.py for a version: the imports, functions, classes and literal constants of the file that
    defines `runner` (not its other statements, so a training script is not run again at load), then
    `class Model(runner)` with the signature. ValueError when the class has no source file (a REPL's)."""
    if not isinstance(runner, type):
        raise ValueError(f"runner must be a class, got {runner!r}")
    try:
        path = inspect.getsourcefile(runner)
    except TypeError:
        path = None
    if path is None or not Path(path).is_file():
        raise ValueError(
            f"runner {runner.__qualname__}: its source file cannot be found; define it in a file"
        )
    if "." in runner.__qualname__:
        raise ValueError(f"runner {runner.__qualname__}: define the class at the top level of its file")
    text = Path(path).read_text(encoding="utf-8")
    lines = text.splitlines()
    kept: list[str] = []
    for node in ast.parse(text).body:
        if isinstance(node, _KEPT) or _constant(node):
            decorators = getattr(node, "decorator_list", [])
            start = min([node.lineno, *(d.lineno for d in decorators)])
            assert node.end_lineno is not None
            kept.append("\n".join(lines[start - 1 : node.end_lineno]))
    body = [f"    {key} = {pprint.pformat(list(value), width=100, compact=True)}"
            for key, value in (("inputs", inputs), ("outputs", outputs)) if value is not None]  # fmt: skip
    model = f"class Model({runner.__name__}):\n" + "\n".join(
        ['    """What the python runtime serves: the registered runner with its signature."""', *body]
    )
    header = f'"""{runner.__name__} from {Path(path).name}, written by sluice.server.registration."""'
    return "\n\n\n".join([header, *kept, model]) + "\n"


def _constant(node: ast.stmt) -> bool:
    """A top-level `NAME = literal` (labels, sizes): kept, where other statements (training) are not."""
    if not isinstance(node, ast.Assign | ast.AnnAssign) or node.value is None:
        return False
    try:
        ast.literal_eval(node.value)
    except ValueError:
        return False
    return True


def _saved_model(runner: type[Any], model: Any) -> tuple[str, bytes] | None:
    """The file that keeps `model`: props.json from the runner's `save_model`, else model.pkl."""
    if model is None:
        return None
    save = getattr(runner, "save_model", None)
    if callable(save):
        props = save(model)
        try:
            text = json.dumps({} if props is None else props, indent=2)
        except TypeError as exc:
            raise ValueError(f"{runner.__qualname__}.save_model must return JSON-able props: {exc}") from None
        return "props.json", (text + "\n").encode()
    return "model.pkl", pickle.dumps(model)


def _requirement(line: str) -> str:
    try:
        return str(Requirement(line))
    except InvalidRequirement as exc:
        raise ValueError(f"requirement {line!r}: {exc}") from None


def _artifact(path: str | os.PathLike[str]) -> tuple[Path, Path]:
    """An artifact and where it goes under artifacts/: its path relative to the current directory, or
    its name when it lies elsewhere."""
    source = Path(path)
    if not source.exists():
        raise ValueError(f"artifact {str(source)!r}: no such file or directory")
    resolved = source.resolve()
    try:
        relative = resolved.relative_to(Path.cwd().resolve())
    except ValueError:
        relative = Path(resolved.name)
    return resolved, relative
