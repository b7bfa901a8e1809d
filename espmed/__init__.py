"""espmed: deploy ESP-MedSAM segmentation on scanner-side devices.

Importing the top-level package must stay cheap and torch-free: `espmed.runtimes` is embedded in
devices that do not install torch.

Layers. A module imports only from its own package and the packages listed for it (function-level
imports included); `tests/test_layering.py` enforces this table and that no two files import each
other, directly or in a cycle.

| package            | may import                                                         |
|--------------------|--------------------------------------------------------------------|
| `espmed` (version), `espmed.errors`, `espmed.atomic` | nothing of espmed (the standard library)  |
| `espmed.metrics`, `espmed.machine`, `espmed.baseline` | the above                        |
| `espmed.io`        | the above                                                          |
| `espmed.model`     | the above (torch)                                                  |
| `espmed.runtimes`  | the above; `espmed.model` only in `runtimes.torch_reference`       |
| `espmed.pipeline`  | the above (what predict and serve segment with)                    |
| `espmed.data`      | the above                                                          |
| `espmed.export`    | the above                                                          |
| `espmed.train`     | the above                                                          |
| `espmed.benchmark` | the above                                                          |
| `espmed.serve`     | the above                                                          |
| `espmed.cli`       | everything                                                         |

"The above" is every row above the package's own, so the order is the layering.
"""

__version__ = "0.1.0"
