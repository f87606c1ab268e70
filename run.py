"""Entry point: ``python run.py [experiment=NAME] [group=option ...] [key=value ...]``.

Heavy imports happen inside ``main`` so that ``--help`` and config errors answer fast.
"""

import os
import sys

import hydra
from omegaconf import DictConfig

ROOT = os.path.dirname(os.path.abspath(__file__))
os.environ.setdefault("SEIT_ROOT", ROOT)
sys.path.insert(0, os.path.join(ROOT, "src"))

from seit.utils.config import print_config, register_resolvers  # noqa: E402  (light: omegaconf only)
from seit.utils.errors import run_cli, task_errors  # noqa: E402  (light)

register_resolvers()


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig):
    from seit.pipelines import run_task

    with task_errors():  # one line, not Hydra's trimmed traceback (HYDRA_FULL_ERROR=1 for that)
        if cfg.get("print_config"):
            print_config(cfg)
        result = run_task(cfg)
    metric = cfg.get("optimized_metric")
    if metric and isinstance(result, dict):
        return result.get("metrics", {}).get(metric)
    return None


if __name__ == "__main__":
    run_cli(main)  # errors as one line; HYDRA_FULL_ERROR=1 for the traceback
