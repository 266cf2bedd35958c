"""The ``distill`` section of a recipe (``slimtune distill`` flags derive from it)."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from slimtune.config.fields import RecipeError, check_ranges, setting


@dataclass
class DistillConfig:
    """The ``distill`` section of a recipe: how the student is built and what it learns from."""

    student: str | None = setting(None, "A student model folder or alias to train instead of building one from the teacher (minilm-l3: the packaged 3-layer paraphrase-MiniLM-L3-v2).")
    student_layers: int | None = setting(None, "Keep this many teacher layers, evenly spaced from first to last (6 → 3 keeps 0,2,5).", ge=1)
    student_layer_map: list[int] | None = setting(None, "Teacher layers to keep, e.g. 0,2,5 (overrides the even spacing).")
    student_hidden_size: int | None = setting(None, "Narrower student with this hidden size, freshly initialised (needs many more steps).", ge=1)
    alpha: float = setting(0.5, "Weight of the hard-label cross-entropy; 1 - alpha weighs the soft teacher term (alpha=1: no KD).", ge=0, le=1)
    temperature: float = setting(2.0, "Softmax temperature of the soft term (the KL is scaled by T²).", gt=0)
    kl_direction: Literal["forward", "reverse"] = setting("forward", "forward: KL(teacher ‖ student); reverse: KL(student ‖ teacher), mode-seeking (causal LMs).")
    logit_loss: Literal["kl", "mse"] = setting("kl", "Soft term on the logits: kl = T²·KL of tempered softmaxes; mse = mean squared error between raw logits (Kim et al. 2021; temperature and kl_direction unused).")
    intermediate: bool = setting(False, "Also match hidden states (MSE) and attention maps (KL) of uniformly mapped layers (TinyBERT/PKD).")
    hidden_weight: float = setting(1.0, "Weight of the hidden-state MSE term (with intermediate).", ge=0)
    attention_weight: float = setting(1.0, "Weight of the attention-map KL term (with intermediate; forces eager attention).", ge=0)
    teacher_dtype: Literal["float32", "bfloat16"] = setting("float32", "Precision the frozen teacher runs in (bfloat16 halves its memory).")
    teacher_cache: Literal["auto", "on", "off"] = setting("auto", "Cache teacher logits on disk: auto = for classifiers without intermediate KD.")
    cache_dir: str | None = setting(None, "Folder of teacher-logit caches (default: $SLIMTUNE_CACHE/distill).")
    unlabeled: list[str] | None = setting(None, "Transfer set: CSV/TSV/JSONL files whose rows the student learns from the teacher's soft labels only (labels, if any, are ignored; rows equal to a labelled training row are dropped). Classifiers only.")
    max_unlabeled_samples: int | None = setting(None, "Keep this many transfer-set rows, chosen by a seeded shuffle (None: all).", ge=1)

    def validate(self, recipe: Any) -> None:
        """Raise RecipeError naming the key on bad values or contradictory settings."""
        check_ranges(self, "distill")
        if not 0.0 <= self.alpha <= 1.0:
            raise RecipeError(f"distill.alpha: must be in [0, 1], got {self.alpha}")
        if self.temperature <= 0:
            raise RecipeError(f"distill.temperature: must be > 0, got {self.temperature}")
        if self.hidden_weight < 0 or self.attention_weight < 0:
            raise RecipeError("distill.hidden_weight / distill.attention_weight: must be >= 0")
        built = self.student_layers is not None or bool(self.student_layer_map) or self.student_hidden_size is not None
        if self.student is not None and built:
            raise RecipeError("distill.student: give a student folder or student_layers/layer_map/hidden_size, not both")
        if self.student is None and not built:
            raise RecipeError("distill: say how to build the student (--student-layers N, --student-layer-map 0,2,5 "
                              "or --student DIR)")
        if self.student is not None:
            from slimtune.models.loading import ALIASES, ModelError, check_exists  # torch: lazy

            if self.student not in ALIASES and not Path(self.student).is_dir():
                raise RecipeError(f"distill.student: not a model folder or alias ({', '.join(ALIASES)}): "
                                  f"{self.student}")
            try:
                check_exists(self.student)  # an alias whose package is missing says what to install
            except ModelError as e:
                raise RecipeError(f"distill.student: {e}") from None
        if self.student_layers is not None and self.student_layers < 1:
            raise RecipeError(f"distill.student_layers: must be >= 1, got {self.student_layers}")
        if self.unlabeled:
            if recipe.model.task != "classification":
                raise RecipeError("distill.unlabeled: a transfer set is for classifiers (causal-LM text needs no labels: "
                                  "add it to data.train)")
            if self.alpha >= 1.0:
                raise RecipeError("distill.unlabeled: transfer-set rows have no labels, so they need the teacher "
                                  "(alpha < 1)")
            for f in self.unlabeled:
                if not Path(f).is_file():
                    raise RecipeError(f"distill.unlabeled: file not found: {f}")
        if self.max_unlabeled_samples is not None and self.max_unlabeled_samples < 1:
            raise RecipeError(f"distill.max_unlabeled_samples: must be >= 1, got {self.max_unlabeled_samples}")
        if self.alpha >= 1.0 and not self.intermediate:
            print("[slimtune] distill.alpha = 1 without intermediate KD: plain fine-tuning of the student "
                  "(the no-KD baseline)", file=sys.stderr)
