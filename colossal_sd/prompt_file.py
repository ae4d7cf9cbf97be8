"""Prompt files in kohya's sample-prompt format: what sample.py draws and what the training grids show.

One prompt per line; blank lines and lines starting with ``#`` are skipped. Options follow the prompt, each
after `` --`` (kohya-ss/sd-scripts splits the line on " --"; names are case-insensitive):

    an emoji of a red heart --n blurry, text --w 512 --h 768 --d 42 --l 7.5 --s 20 --ss euler_a

    --n  negative prompt          --d  seed (image i of the line gets seed + i)
    --w  width  (a multiple of 8) --l  guidance scale (CFG)
    --h  height (a multiple of 8) --s  denoising steps, 1..1000
    --ss sampler (scheduler name: see colossal_sd.sampling.SCHEDULERS)

An option left out takes the command line's default (sample.py's --negative_prompt, --width, ...; the trainer's
validation flags). Unlike kohya, which skips what it cannot parse, a malformed or unknown option is a one-line
error naming the file and line: a typo must not silently sample something else.
"""

import dataclasses
import math
from pathlib import Path
from typing import List, Optional

from colossal_sd.errors import UserError

SIZE_MULTIPLE = 8  # the VAE's factor: diffusers' pipelines refuse other sizes
MAX_STEPS = 1000  # kohya's bound; also the schedulers' num_train_timesteps
MAX_SEED = 2**63 - 1  # torch.manual_seed's range, with room for seed + image index


@dataclasses.dataclass(frozen=True)
class Prompt:
    """One line of a prompt file. None: take the default (:meth:`with_defaults`)."""
    prompt: str
    negative_prompt: Optional[str] = None
    width: Optional[int] = None
    height: Optional[int] = None
    seed: Optional[int] = None
    guidance_scale: Optional[float] = None
    steps: Optional[int] = None
    sampler: Optional[str] = None

    def with_defaults(self, **defaults) -> "Prompt":
        return dataclasses.replace(self, **{name: value for name, value in defaults.items()
                                            if getattr(self, name) is None})


def _whole(text: str, what: str) -> int:
    if not text.isdigit():
        raise ValueError(f"{what}, a whole number")
    return int(text)


def check_size(value: int, label: str) -> int:
    if value < SIZE_MULTIPLE or value % SIZE_MULTIPLE:
        raise UserError(f"{label} must be a multiple of {SIZE_MULTIPLE} pixels, at least {SIZE_MULTIPLE} "
                        f"(got {value}); try {max(SIZE_MULTIPLE, value // SIZE_MULTIPLE * SIZE_MULTIPLE)}")
    return value


def check_steps(value: int, label: str) -> int:
    if not 1 <= value <= MAX_STEPS:
        raise UserError(f"{label} must be in [1, {MAX_STEPS}] (got {value})")
    return value


def check_seed(value: int, label: str) -> int:
    if not 0 <= value <= MAX_SEED:
        raise UserError(f"{label} must be in [0, {MAX_SEED}] (got {value})")
    return value


def check_guidance(value: float, label: str) -> float:
    if not (math.isfinite(value) and value >= 0):
        raise UserError(f"{label} must be a finite number >= 0, 1 or less disables guidance (got {value})")
    return value


def check_sampler(value: str, label: str) -> str:
    from colossal_sd.sampling import scheduler_name
    return scheduler_name(value, label)


def _text(text: str, what: str) -> str:
    return text


def _float(text: str, what: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise ValueError(f"{what}, a number") from None


# option -> (Prompt field, parse text, check value, what it is)
OPTIONS = {
    "n": ("negative_prompt", _text, None, "the negative prompt"),
    "w": ("width", _whole, check_size, "the width in pixels"),
    "h": ("height", _whole, check_size, "the height in pixels"),
    "d": ("seed", _whole, check_seed, "the seed"),
    "l": ("guidance_scale", _float, check_guidance, "the guidance scale"),
    "s": ("steps", _whole, check_steps, "the denoising steps"),
    "ss": ("sampler", _text, check_sampler, "the sampler"),
}


def parse_line(line: str, where: str) -> Prompt:
    """One prompt line (comments and blanks already skipped); `where` ("file line N") prefixes any error."""
    prompt, *options = line.strip().split(" --")
    prompt = prompt.strip()
    if not prompt or prompt.startswith("--"):
        raise UserError(f"{where}: the line has options but no prompt before them")
    fields = {}
    for option in options:
        name, _, value = option.strip().partition(" ")
        name, value = name.lower(), value.strip()
        if name not in OPTIONS:
            known = " ".join(f"--{o}" for o in OPTIONS)
            raise UserError(f"{where}: unknown option '--{name}' (prompt-file options: {known})")
        field, parse, check, what = OPTIONS[name]
        if not value and field != "negative_prompt":
            raise UserError(f"{where}: --{name} needs a value ({what})")
        try:
            parsed = parse(value, what)
        except ValueError as e:
            raise UserError(f"{where}: --{name} {value}: expected {e}") from None
        fields[field] = check(parsed, f"{where}: --{name}") if check else parsed
    return Prompt(prompt, **fields)


def read_prompt_file(path) -> List[Prompt]:
    """Every prompt of the file, in order. A missing, unreadable or prompt-less file is a one-line error."""
    name = str(path)
    try:
        lines = Path(path).expanduser().read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise UserError(f"prompt file '{name}' does not exist") from None
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read prompt file '{name}': {e}") from None
    prompts = [parse_line(line, f"{name} line {number}") for number, line in enumerate(lines, start=1)
               if line.strip() and not line.strip().startswith("#")]
    if not prompts:
        raise UserError(f"prompt file '{name}' has no prompts (only blank lines and # comments)")
    return prompts


def validation_prompts(args) -> List[Prompt]:
    """The trainer's validation prompts: --validation_prompts_file's lines, or --validation_prompts, each filled in
    with the validation flags."""
    if getattr(args, "validation_prompts_file", None):
        prompts = read_prompt_file(args.validation_prompts_file)
    else:
        prompts = [Prompt(text) for text in args.validation_prompts or []]
    return [p.with_defaults(seed=args.validation_seed, steps=args.validation_inference_steps) for p in prompts]
