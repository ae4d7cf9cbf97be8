"""DreamBooth with prior preservation, and regularisation images: every batch pairs training samples with class
(regularisation) samples, whose loss is weighted by --prior_loss_weight.

    --instance_data_dir DIR --instance_prompt "a photo of sks dog"     the subject (diffusers' flag names)
    --with_prior_preservation --class_data_dir DIR --class_prompt "a photo of a dog" --num_class_images 100
    --reg_data_dir DIR                                                  kohya's: regularisation concept folders
    is_reg = true                                                       a --dataset_config subset's

The data are subsets (colossal_sd.dataset_config): the instance images, captioned by --instance_prompt where an
image has no caption of its own (kohya's `class_tokens`), and the class images, captioned by --class_prompt, with
`is_reg` set; they are one dataset, so caching, caption variants and repeats work for both as for any data.

Missing class images are drawn by the base model before training (`make_class_images`): `class-00000.png`, ...,
image i from seed + i, sharded across the ranks, each written to a temp file and renamed, so a killed run leaves
no half image and a rerun draws the same images. A folder holding --num_class_images images is reused as it is.

Pairing (`PairedDataset`), kohya's rule: an epoch is the training samples (repeats counted), and each is paired
with one regularisation sample, taken in turn (sample i of epoch e with regularisation sample (e * n + i) mod m),
so over the epochs every class image is used, however few or many there are. A batch is its B training samples
followed by their B class samples, as diffusers' `collate_fn` lays it out; colossal_sd.loss splits it in halves.
"""

import gc
from pathlib import Path

import numpy as np
import torch

from colossal_sd import data, dataset_config, distributed, sampling
from colossal_sd.concept_folders import image_files
from colossal_sd.dataset_config import IS_REG, Subset
from colossal_sd.errors import UserError
from colossal_sd.prompt_file import Prompt

CLASS_IMAGE = "class-{:05d}.png"
CLASS_IMAGE_STEPS = 25  # DPM-Solver++: as good as 50 steps of diffusers' default scheduler, in half the time
CLASS_FLAGS = ("class_data_dir", "class_prompt")


def add_arguments(parser):
    group = parser.add_argument_group("DreamBooth and regularisation")
    group.add_argument("--instance_data_dir", default=None,
                       help="DreamBooth: a folder of the subject's images (read like --train_data_dir).")
    group.add_argument("--instance_prompt", default=None,
                       help="The caption of every instance image that has no caption file, e.g. 'a photo of sks "
                            "dog'.")
    group.add_argument("--with_prior_preservation", action="store_true",
                       help="Pair every batch of instance images with as many class images (--class_data_dir), "
                            "whose loss is weighted by --prior_loss_weight.")
    group.add_argument("--class_data_dir", default=None,
                       help="The class images; missing ones (up to --num_class_images) are drawn by the base model "
                            "from --class_prompt before training.")
    group.add_argument("--class_prompt", default=None,
                       help="The class images' prompt and caption, e.g. 'a photo of a dog'.")
    group.add_argument("--num_class_images", type=int, default=100,
                       help="With --with_prior_preservation: how many class images --class_data_dir must hold.")
    group.add_argument("--sample_batch_size", type=int, default=4,
                       help="Class images drawn per batch (per process) while generating them.")
    group.add_argument("--prior_loss_weight", type=float, default=1.0,
                       help="The weight of the class (or regularisation) images' loss.")
    group.add_argument("--reg_data_dir", default=None,
                       help="kohya's regularisation images: a folder read like --train_data_dir (concept folders "
                            "`<N>_<tokens>/` repeat and caption them), paired with the training samples like "
                            "class images and weighted by --prior_loss_weight.")


def check_arguments(args):
    """Before the data flags' default applies: --instance_data_dir is the training data."""
    data_flags = [f"--{flag}" for flag in ("dataset_name", "train_data_dir", "dataset_config") if getattr(args, flag)]
    if args.instance_data_dir and data_flags:
        raise UserError(f"--instance_data_dir names the training data: drop {' and '.join(data_flags)}")
    if args.instance_data_dir and not Path(args.instance_data_dir).expanduser().is_dir():
        raise UserError(f"--instance_data_dir '{args.instance_data_dir}' is not a directory")
    if args.instance_prompt is not None and args.dataset_config:
        raise UserError("--instance_prompt with --dataset_config: set class_tokens in the file's subsets instead")
    if args.with_prior_preservation:
        for flag in CLASS_FLAGS:
            if not getattr(args, flag):
                raise UserError(f"--with_prior_preservation needs --{flag}")
    else:
        for flag in CLASS_FLAGS:
            if getattr(args, flag):
                raise UserError(f"--{flag} goes with --with_prior_preservation: add it or drop --{flag}")
    if args.reg_data_dir:
        if args.with_prior_preservation:
            raise UserError("--reg_data_dir and --with_prior_preservation both give class images; use one")
        if args.dataset_config:
            raise UserError("--reg_data_dir with --dataset_config: add it to the file as a subset with "
                            "is_reg = true")
        if not Path(args.reg_data_dir).expanduser().is_dir():
            raise UserError(f"--reg_data_dir '{args.reg_data_dir}' is not a directory")
    if pairs(args):
        for flag in ("aspect_ratio_bucketing", "streaming"):
            if getattr(args, flag):
                raise UserError(f"--{flag} cannot pair training and class images yet; drop --{flag}")


def pairs(args) -> bool:
    """Whether batches pair training samples with class or regularisation samples."""
    if getattr(args, "with_prior_preservation", False) or getattr(args, "reg_data_dir", None):
        return True
    return bool(getattr(args, "dataset_config", None)) and any(
        subset.is_reg for subset in dataset_config.read_subsets(args.dataset_config))


# ---------------------------------------------------------------- the data


def subsets(args) -> list:
    """The data as subsets: the --dataset_config file's or the training data's, then the class or regularisation
    images; None for plain training data (no --dataset_config, no DreamBooth or regularisation flags)."""
    if args.dataset_config:
        made = dataset_config.read_subsets(args.dataset_config)
    elif args.instance_data_dir or args.instance_prompt is not None or args.with_prior_preservation or (
            args.reg_data_dir):
        made = [Subset(train_data_dir=args.instance_data_dir or args.train_data_dir,
                       dataset_name=None if args.instance_data_dir else args.dataset_name,
                       dataset_config_name=args.dataset_config_name, image_column=args.image_column,
                       caption_column=args.caption_column, caption_extension=args.caption_extension,
                       class_tokens=args.instance_prompt)]
    else:
        return None
    if args.with_prior_preservation:
        made.append(Subset(train_data_dir=args.class_data_dir, class_tokens=args.class_prompt, is_reg=True))
    if args.reg_data_dir:
        made.append(Subset(train_data_dir=args.reg_data_dir, caption_extension=args.caption_extension, is_reg=True))
    return made


def build_dataset(args, tokenizer, resolution: int, seed: int, say=lambda message: None):
    """The training set (colossal_sd.data.build_dataset's counterpart), its class images among its rows."""
    made = subsets(args)
    if made is None:
        return data.build_dataset(args, tokenizer, resolution, seed, say)
    where = f"--dataset_config {args.dataset_config}" if args.dataset_config else made[0].name
    return dataset_config.build_dataset(args, tokenizer, resolution, seed, say, made, where)


def paired(dataset, images, prior_loss_weight: float, say):
    """(the dataset the loader reads, its collate function): `dataset` (images, or their cache) as pairs when
    `images`, the ImageCaptionDataset, holds regularisation rows."""
    if IS_REG not in images.ds.column_names:
        return dataset, data.collate
    is_reg = np.asarray(images.ds[IS_REG], dtype=bool)[images.rows]
    training, regularisation = np.flatnonzero(~is_reg), np.flatnonzero(is_reg)
    if not len(regularisation):
        return dataset, data.collate
    if not len(training):
        raise UserError("every image is a regularisation image: there is nothing to train on")
    say(f"prior preservation: each of the {len(training)} training samples an epoch is paired with one of "
        f"{len(regularisation)} class/regularisation samples, their loss weighted by {prior_loss_weight:g}")
    return PairedDataset(dataset, training, regularisation), collate_pairs


class PairedDataset(torch.utils.data.Dataset):
    """Sample i: (training sample i, its regularisation sample), drawn from (epoch, i) alone, so any rank,
    worker or resumed run gets the same pair. See the module docstring for the rule."""

    def __init__(self, inner, training, regularisation):
        self.inner, self.training, self.regularisation = inner, training, regularisation
        self.epoch = 0

    def __len__(self):
        return len(self.training)

    def set_epoch(self, epoch: int):
        self.epoch = epoch
        self.inner.set_epoch(epoch)

    def __getitem__(self, index):
        partner = self.regularisation[(self.epoch * len(self.training) + index) % len(self.regularisation)]
        return self.inner[int(self.training[index])], self.inner[int(partner)]


def collate_pairs(pairs):
    """The training samples, then their regularisation samples: the loss splits the batch in these halves."""
    return data.collate([first for first, _ in pairs] + [second for _, second in pairs])


# ---------------------------------------------------------------- class images


def missing_class_images(folder: Path, wanted: int) -> list:
    """The numbers of the class images to draw: enough of the first free `class-NNNNN.png` names to make
    `wanted` images in `folder`, counting any images already there."""
    have = len(image_files(folder)) if folder.is_dir() else 0
    missing, number = [], 0
    while have + len(missing) < wanted:
        if not (folder / CLASS_IMAGE.format(number)).exists():
            missing.append(number)
        number += 1
    return missing


def make_class_images(args, parts, resolution: int, seed: int, info, engine, say):
    """Draw the missing class images with the base model, each rank its share. Collective."""
    folder = Path(args.class_data_dir).expanduser()
    missing = missing_class_images(folder, args.num_class_images)
    distributed.barrier()  # every rank has listed the folder before any rank writes into it
    if not missing:
        say(f"prior preservation: {args.class_data_dir} holds at least --num_class_images {args.num_class_images} "
            "images: reusing them, generating none")
        return
    say(f"prior preservation: generating {len(missing)} class images of '{args.class_prompt}' into "
        f"{args.class_data_dir} ({args.num_class_images - len(missing)} there already)")
    folder.mkdir(parents=True, exist_ok=True)
    prompt = Prompt(args.class_prompt, width=resolution, height=resolution, steps=CLASS_IMAGE_STEPS,
                    guidance_scale=sampling.DEFAULT_GUIDANCE)
    mine = sampling.share(missing, info.rank, info.world_size)
    with _base_pipeline(parts, info.device) as pipeline, engine.autocast():
        for start in range(0, len(mine), args.sample_batch_size):
            numbers = mine[start:start + args.sample_batch_size]
            seeds = [seed + number for number in numbers]
            images, scheduler = sampling.generate(pipeline, prompt, seeds)
            for number, image_seed, image in zip(numbers, seeds, images):
                sampling.save_png(image, folder / CLASS_IMAGE.format(number),
                                  sampling.infotext(prompt, image_seed, sampling.sampler_label(scheduler),
                                                    Path(parts.source).name))
    distributed.barrier()  # every rank's images are written before any rank reads the folder
    say(f"prior preservation: generated {len(missing)} class images")


class _base_pipeline:
    """The family's pipeline around the loaded parts (no copies), the UNet on the device while it draws; on
    exit its activations and caches are freed, and the UNet is back where it was."""

    def __init__(self, parts, device):
        self.parts, self.device = parts, device

    def __enter__(self):
        from diffusers import DPMSolverMultistepScheduler

        self.home = next(self.parts.unet.parameters()).device
        self.was_training = self.parts.unet.training
        self.parts.unet.to(self.device).eval()
        scheduler = DPMSolverMultistepScheduler.from_config(self.parts.noise_scheduler.config)
        components = dict(self.parts.components(), scheduler=scheduler)
        self.pipeline = self.parts.family.pipeline()(**components, **self.parts.family.pipeline_kwargs())
        self.pipeline.set_progress_bar_config(disable=True)
        return self.pipeline

    def __exit__(self, *exc):
        self.parts.unet.to(self.home).train(self.was_training)
        del self.pipeline
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        return False
