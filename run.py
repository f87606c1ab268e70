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

register_resolvers()


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig):
    from seit.pipelines import run_task

    if cfg.get("print_config"):
        print_config(cfg)
    result = run_task(cfg)
    metric = cfg.get("optimized_metric")
    if metric and isinstance(result, dict):
        return result.get("metrics", {}).get(metric)
    return None


if __name__ == "__main__":
    main()
