"""Fine-tune Stable Diffusion with Colossal-AI.

    torchrun --nproc_per_node 2 stable_diffusion_colossalai_trainer.py --output_dir out
    python stable_diffusion_colossalai_trainer.py --help

With no model or data flags it trains the embedded tiny model on the embedded emoji set, offline.
"""

import os
import sys
import warnings


def main(argv=None):
    from colossal_sd.train import train
    from parse_arguments import parse_args

    train(parse_args(argv))


def quiet_libraries():
    """Library chatter (deprecations, Colossal-AI banners) buries the lines users need."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning, module="torch.amp")
    import logging
    logging.getLogger("colossalai").setLevel(logging.WARNING)


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    quiet_libraries()
    from colossal_sd.errors import exit_on_user_error

    exit_on_user_error(main)
