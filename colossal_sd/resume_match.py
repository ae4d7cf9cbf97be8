"""What a resumed run must share with its checkpoint, and what it may change.

Every checkpoint records under "must_match" the images per optimizer step, the resolution and a fingerprint of
the base model. A resume that differs in any of them stops with one line that names the difference, unless
--allow_mismatched_resume (then the log says what changed). A run that would end at or before the checkpoint's
step is an error too. A new --learning_rate, --lr_scheduler or --lr_warmup_steps is allowed and honoured from the
resumed step on: the restored scheduler state would otherwise bring back the old learning rate.
"""

from typing import Callable, List, Tuple

from colossal_sd.errors import CleanStop, UserError
from colossal_sd.final_outputs import finished_step

KEY = "must_match"
SCHEDULE_FLAGS = ("lr_scheduler", "lr_warmup_steps")


def must_match(images_per_step: int, resolution: int, base_model: dict) -> dict:
    return {"images_per_step": images_per_step, "resolution": resolution, "base_model": base_model}


def check(state: dict, now: dict, args, world_size: int, max_steps: int, name: str, log: Callable[[str], None]):
    """Raise a UserError where this run cannot continue `state` (checkpoint `name`) as asked."""
    _check_max_steps(state["global_step"], max_steps, args, name)
    recorded = state.get(KEY)
    if not recorded or not now:  # a checkpoint written before these were recorded resumes as before
        return
    differences = list(_differences(recorded, now, state, args, world_size, name))
    if not differences:
        return
    what = "; ".join(w for w, _ in differences)
    if not args.allow_mismatched_resume:
        raise UserError(f"{what}; pass {' '.join(f for _, f in differences)}, "
                        "or --allow_mismatched_resume to continue anyway")
    log(f"--allow_mismatched_resume: {what}; continuing anyway")


def _check_max_steps(step: int, max_steps: int, args, name: str):
    if max_steps > step:
        return
    if step == max_steps and finished_step(args.output_dir) == step:  # e.g. a job chain's one job too many
        raise CleanStop(f"{name} is the run's last step, and {args.output_dir} already holds its final outputs: "
                        f"nothing to do; pass --max_train_steps {step + 1} or more to train further")
    ends = (f"--max_train_steps {args.max_train_steps}" if args.max_train_steps else
            f"--num_train_epochs {args.num_train_epochs} ({max_steps} steps)")
    raise UserError(f"{name} is at step {step}, and {ends} would train no further; "
                    f"pass --max_train_steps {step + 1} or more to continue from it")


def _differences(recorded: dict, now: dict, state: dict, args, world_size: int, name: str) -> List[Tuple[str, str]]:
    """(what differs, the flags that restore it) for each mismatch."""
    old_args = state.get("args", {})
    if recorded["images_per_step"] != now["images_per_step"]:
        batch, accumulation, processes = (old_args.get("train_batch_size"),
                                          old_args.get("gradient_accumulation_steps"), state.get("processes"))
        if processes == world_size:
            fix = f"--train_batch_size {batch} --gradient_accumulation_steps {accumulation}"
        else:
            fix = (f"--train_batch_size and --gradient_accumulation_steps that make {recorded['images_per_step']} "
                   f"images per step over {world_size} processes")
        yield (f"{name} was trained with {recorded['images_per_step']} images per step "
               f"({_images(batch, accumulation, processes)}), this run has {now['images_per_step']} "
               f"({_images(args.train_batch_size, args.gradient_accumulation_steps, world_size)})", fix)
    if recorded["resolution"] != now["resolution"]:
        yield (f"{name} was trained at {recorded['resolution']} px, this run asks for {now['resolution']} px",
               f"--resolution {recorded['resolution']}")
    components = list(dict.fromkeys([*now["base_model"], *recorded["base_model"]]))
    changed = [c for c in components if recorded["base_model"].get(c) != now["base_model"].get(c)]
    if changed:
        old, new = old_args.get("pretrained_model_name_or_path"), args.pretrained_model_name_or_path
        source = (f"--pretrained_model_name_or_path {old} then and now: its files changed" if old == new else
                  f"--pretrained_model_name_or_path {old} then, {new} now")
        yield (f"{name} was trained from another base model (its {' and '.join(changed)} "
               f"differ{'s' if len(changed) == 1 else ''}; {source})",
               f"--pretrained_model_name_or_path {old}" if old != new else "the base model it was trained from")


def _images(batch, accumulation, processes) -> str:
    return f"batch {batch} x accumulation {accumulation} x {processes} process{'es' if processes != 1 else ''}"


# ---------------------------------------------------------------- the learning rate schedule


def schedule_changes(old_args: dict, args, old_lrs: list, new_lrs: list, step: int) -> List[str]:
    """A line for each learning-rate setting this run changes, honoured from `step` on."""
    changes = []
    if old_lrs != new_lrs:
        changes.append(f"learning rate: {_lrs(old_lrs)} in the checkpoint, {_lrs(new_lrs)} from step {step} on")
    for flag in SCHEDULE_FLAGS:
        old, new = old_args.get(flag), getattr(args, flag)
        if flag in old_args and str(old) != str(new):
            changes.append(f"--{flag}: {old} in the checkpoint, {new} from step {step} on")
    return changes


def continue_schedule(lr_scheduler, base_lrs: list, step: int):
    """Restart this run's own schedule (its shape comes from its get_scheduler call) at `step`, with its own
    base learning rates, and set the optimizer's learning rates to the schedule's value there."""
    lr_scheduler.base_lrs = list(base_lrs)
    for group, lr in zip(lr_scheduler.optimizer.param_groups, base_lrs):
        group["initial_lr"] = lr
    lr_scheduler.last_epoch = step - 1
    lr_scheduler.step()


def _lrs(lrs: list) -> str:
    return ", ".join(f"{lr:g}" for lr in dict.fromkeys(lrs))
