"""Which package each optional runtime feature imports, and which extra of pyproject.toml
installs it: the one place that says so (tests/test_extras.py checks pyproject against it).

`extra` None means rayrl's own dependencies, which `pip install rayrl[cpu]` and `[gpu]`
both install: what a default study or a documented verb uses at run time belongs there.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass

from rayrl.config import Config, ConfigError


@dataclass(frozen=True)
class Need:
    module: str  # what rayrl (or Ray Tune's callback) imports
    package: str  # the distribution pip installs it from
    extra: str | None  # the extra of pyproject.toml that lists it; None: the dependencies


# study.trackers, by name: Tune's logger callbacks import these, after Ray has started (and
# its TensorBoard callback only logs a warning when tensorboardX is missing).
TRACKERS: dict[str, tuple[Need, ...]] = {
    "tensorboard": (Need("tensorboardX", "tensorboardX", None),),
    "mlflow": (Need("mlflow", "mlflow-skinny", "trackers"),),
    "wandb": (Need("wandb", "wandb", "trackers"),),
}
# `rayrl models convert` (and a config whose model is a .gguf file): transformers' GGUF reader.
CONVERT: tuple[Need, ...] = (Need("gguf", "gguf", None), Need("accelerate", "accelerate", None))
# The viewer the README tells you to run on a study's event files.
VIEWER: tuple[Need, ...] = (Need("tensorboard", "tensorboard", None),)


def missing(needs: tuple[Need, ...]) -> list[Need]:
    """The needs whose module is not installed (found without importing it)."""
    return [n for n in needs if importlib.util.find_spec(n.module) is None]


def install_hint(need: Need) -> str:
    extra = f"rayrl[{need.extra}]" if need.extra else "rayrl[cpu] (or rayrl[gpu])"
    return f"pip install '{extra}' (or pip install {need.package})"


def check_trackers(cfg: Config) -> None:
    """Every tracker of study.trackers has its package installed; checked before Ray starts,
    where a missing one would otherwise fail (or, for TensorBoard, log nothing) later."""
    for name in cfg.study.trackers:
        for need in missing(TRACKERS[name]):
            raise ConfigError(
                f"{cfg.source or '<config>'}: key 'study.trackers' lists {name!r}, whose "
                f"package {need.package} (module {need.module}) is not installed: "
                f"{install_hint(need)}"
            )
