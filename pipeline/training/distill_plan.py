"""Which models distillation makes and which of a run's models phases 4 and 5 read: decisions on the
configuration alone, without TensorFlow (phase 5 imports this and runs without it; training is
pipeline/training/distill.py).
"""
from __future__ import annotations

from pipeline.config import BackboneConfig, RunConfig
from pipeline.core.errors import PhaseInputError
from pipeline.core.run_dir import backbone_tag

MODE = "distill"
# The loss slot of a distilled student: runs/<run>/train/<student>/distill/, embeddings tag "<student>+distill".
SLOT = "distill"


def students(config: RunConfig) -> list[BackboneConfig]:
    """The backbones `train.student` names (a tag or a backbone name), default all but the teacher's own."""
    wanted = config.train.student.strip()
    teacher_base = config.train.teacher.split("/")[-1].split("+")[0]
    chosen = [b for b in config.extract.backbones
              if (backbone_tag(b) == wanted or b.name == wanted) if wanted] if wanted else \
        [b for b in config.extract.backbones if backbone_tag(b) != teacher_base]
    if not chosen:
        raise PhaseInputError(f"no student: train.student {wanted!r} names none of the run's backbones "
                              f"{[backbone_tag(b) for b in config.extract.backbones]} (other than the teacher's)")
    return chosen


def distilled_models(config: RunConfig) -> list[tuple[str, str]]:
    """(student tag, slot) of every student the configuration distils (phase 4 and 5 read this)."""
    return [(backbone_tag(b), SLOT) for b in students(config)]


def teacher_entry(config: RunConfig) -> tuple[str, str] | None:
    """(backbone tag, loss) of the teacher when it is a trained model of this run (phase 5 lists it)."""
    spec = config.train.teacher.strip()
    if "/" in spec or "+" not in spec:
        return None
    base, loss = spec.split("+", 1)
    return base, loss


# --------------------------------------------------------------------------- which models phases 4 and 5 read

def trained_model_groups(config: RunConfig) -> list[tuple[str, list[str]]]:
    """(backbone tag, its trained models' loss slots) that phase 4 re-embeds under this configuration."""
    if config.train.mode == MODE:
        return [(tag, [slot]) for tag, slot in distilled_models(config)]
    return [(backbone_tag(b), list(config.train.losses)) for b in config.extract.backbones]


def compared_model_groups(config: RunConfig, pretrained: str) -> list[tuple[str, list[str]]]:
    """(backbone tag, the models of it phase 5 compares): `pretrained` for every backbone, then its trained
    models; under distillation the teacher (when it is a model of this run) and the students."""
    if config.train.mode != MODE:
        return [(backbone_tag(b), [pretrained, *config.train.losses]) for b in config.extract.backbones]
    teacher = teacher_entry(config)
    student_tags = {tag for tag, _ in distilled_models(config)}
    return [(tag, [pretrained, *([teacher[1]] if teacher and teacher[0] == tag else []),
                   *([SLOT] if tag in student_tags else [])])
            for tag in (backbone_tag(b) for b in config.extract.backbones)]
