"""Fine-tune Stable Diffusion with Colossal-AI.

    torchrun --nproc_per_node 2 stable_diffusion_colossalai_trainer.py --output_dir out
    python stable_diffusion_colossalai_trainer.py --help

With no model or data flags it trains the embedded tiny model on the embedded emoji set, offline.
"""

import os
import sys
import warnings


def main(argv=None):
    from colossal_sd.hub import go_offline_if_unreachable
    from parse_arguments import parse_args

    args = parse_args(argv)
    if not args.compile:
        # Colossal-AI and bitsandbytes wrap functions in torch.compile as they are imported, which loads the
        # whole inductor (~30 MiB per process) and warms its worker pool. Nothing is compiled without --compile.
        os.environ["TORCHDYNAMO_DISABLE"] = "1"
    go_offline_if_unreachable(args.pretrained_model_name_or_path, args.dataset_name, args.single_file_config)
    quiet_libraries()
    from colossal_sd.train import train

    train(args)


def quiet_libraries():
    """Library chatter (deprecations, Colossal-AI banners) buries the lines users need."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", message=r"Please install")  # optional Colossal-AI kernels
    warnings.filterwarnings("ignore", message=r"Grad strides do not match")  # 1x1 convs, harmless
    import logging
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    import datasets
    datasets.disable_progress_bars()


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from colossal_sd.errors import exit_on_user_error

    exit_on_user_error(main)
