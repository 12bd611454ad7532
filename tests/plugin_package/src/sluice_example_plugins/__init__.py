"""Example third-party Sluice plugins: what a plugin package looks like, and the plugins Sluice's tests use.

A plugin is a class with an `Options` pydantic model, constructed once per model version as
`Plugin(options, context)`, and registered under an entry-point group in the package's pyproject.toml::

    [project.entry-points."sluice.preprocessors"]
    scale = "sluice_example_plugins.preprocess:Scale"

Once the package is installed (`pip install ./tests/plugin_package`), a model's config.toml uses it by name::

    preprocess = [{ name = "scale", input = "x", alias = "raw", factor = 2.0 }]
    postprocess = [{ name = "round", output = "y", decimals = 1 },
                   { name = "label", output = "y", labels = ["a", "b", "c", "d"] }]

    [runtime]                       # instead of an ONNX file: y = 1 + 2x^2, batched like any model
    name = "polynomial"
    coefficients = [1.0, 0.0, 2.0]

- `preprocess.Scale`: a preprocessor (per request, before batching).
- `postprocess.Round`, `postprocess.Label`: postprocessors (per request, after the batch is split).
- `runtime.Polynomial`: a runtime that needs no model file and batches.
- `testing`: plugins that misbehave or report where they ran, for Sluice's own tests.
"""
