"""Caption augmentation: shuffled and dropped comma-separated tags (kohya's --shuffle_caption, --keep_tokens,
--caption_tag_dropout), in a form that survives caching.

Uncached, each step draws a fresh variant from (seed, epoch, index). A cached text encoder cannot: instead
`CaptionOptions.variants` variants of each caption are drawn once from the seed and cached, and each step picks
one of them from (seed, epoch, index) (colossal_sd.caching), so a resumed run sees exactly the same captions.
"""

import random
from dataclasses import asdict, dataclass

DEFAULT_VARIANTS = 4


@dataclass(frozen=True)
class CaptionOptions:
    shuffle_caption: bool = False
    keep_tokens: int = 0  # the first N tags stay in place (the subject's trigger word, say)
    caption_tag_dropout: float = 0.0
    caption_variants: int = DEFAULT_VARIANTS

    @classmethod
    def from_args(cls, args, **overrides) -> "CaptionOptions":
        values = {name: getattr(args, name) for name in cls.__dataclass_fields__ if getattr(args, name, None)
                  is not None}
        return cls(**{**values, **overrides})

    @property
    def augments(self) -> bool:
        return self.shuffle_caption or self.caption_tag_dropout > 0

    def key(self) -> dict:
        """What changes a cached caption (nothing when nothing augments)."""
        return asdict(self) if self.augments else {}


def augment(caption: str, options: CaptionOptions, rng: random.Random) -> str:
    """The caption with its tags after the first `keep_tokens` dropped with probability caption_tag_dropout and
    shuffled; a caption with no commas is one tag."""
    if not options.augments or not caption:
        return caption
    tags = [tag.strip() for tag in caption.split(",")]
    kept, rest = tags[:options.keep_tokens], tags[options.keep_tokens:]
    if options.caption_tag_dropout > 0:
        rest = [tag for tag in rest if rng.random() >= options.caption_tag_dropout]
    if options.shuffle_caption:
        rng.shuffle(rest)
    return ", ".join(tag for tag in kept + rest if tag)


def variants(caption: str, options: CaptionOptions, seed: int, row: int) -> list:
    """The variants of one caption that the cache holds: drawn from (seed, row, k), the same on every rank and
    every run with this seed."""
    if not options.augments:
        return [caption]
    return [augment(caption, options, random.Random(f"{seed}-{row}-caption-{k}"))
            for k in range(options.caption_variants)]
