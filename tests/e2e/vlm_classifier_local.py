"""Runs the cookbook's vlm_classifier recipe (its own `run_experiment` launcher, dataset and evaluator classes)
on a small image-folder dataset generated on disk, since its built-in datasets download from the Hugging Face hub.

The recipe's config hook for data is its `DATASETS` / `EVALUATORS` registries of builders around
`ClassifierDatasetConfig(dataset=…)`, which `datasets.load_dataset` resolves; a local folder name works offline.
Usage: python -m tests.e2e.vlm_classifier_local DATA_DIR EXPERIMENT_DIR MODEL_DIR
"""

from __future__ import annotations

import sys
from pathlib import Path

import chz
import numpy as np
from PIL import Image
from tinker_cookbook.recipes.vlm_classifier import data, train
from tinker_cookbook.recipes.vlm_classifier import eval as vlm_eval
from tinker_cookbook.renderers import TrainOnWhat

CLASSES = ("red square", "blue square")


def write_dataset(root: Path, per_class: int = 4) -> None:
    """An image folder: {split}/{class}/{i}.png, solid colours with noise (labels are the folder names)."""
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for c, name in enumerate(CLASSES):
            d = root / split / name.replace(" ", "_")
            d.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                arr = rng.integers(0, 60, (48 + 8 * i, 64, 3), dtype=np.uint8)
                arr[..., 0 if c == 0 else 2] += 180
                Image.fromarray(arr).save(d / f"{i}.png")


def main(data_dir: str, experiment_dir: str, model_dir: str) -> None:
    root = Path(data_dir)
    write_dataset(root)

    @chz.chz
    class LocalDatasetBuilder(data.Caltech101DatasetBuilder):
        def __call__(self):  # type: ignore[override]
            cfg = data.ClassifierDatasetConfig(
                dataset=str(root),
                dataset_split="train",
                renderer_name=self.renderer_name,
                model_name_for_tokenizer=self.model_name_for_tokenizer,
                batch_size=self.batch_size,
                max_length=self.max_length,
                train_on_what=self.train_on_what or TrainOnWhat.LAST_ASSISTANT_MESSAGE,
                max_image_size=self.max_image_size,
            )
            return data.ClassifierDataset(cfg), None

    @chz.chz
    class LocalEvaluatorBuilder(vlm_eval.Caltech101EvaluatorBuilder):
        def __call__(self):  # type: ignore[override]
            cfg = vlm_eval.ClassifierEvaluatorConfig(
                dataset=str(root),
                dataset_split="test",
                renderer_name=self.renderer_name,
                model_name_for_tokenizer=self.model_name_for_tokenizer,
                temperature=self.temperature,
                max_tokens=self.max_tokens,
                top_p=self.top_p,
                top_k=self.top_k,
                image_column_name="image",
                label_column_name="label",
                n_eval=self.n_eval,
                max_parallel_tasks=self.max_parallel_tasks,
                max_image_size=self.max_image_size,
            )
            return vlm_eval.ClassifierEvaluator(cfg)

    data.DATASETS["local"] = LocalDatasetBuilder
    vlm_eval.EVALUATORS["local"] = LocalEvaluatorBuilder
    train.run_experiment(
        train.ExperimentConfig(
            experiment_dir=experiment_dir,
            dataset="local",
            model_name=model_dir,
            renderer_name="qwen3_vl_instruct",
            behavior_if_log_dir_exists="delete",
            batch_size=2,
            lora_rank=4,
            max_steps=2,
            eval_every=2,
            save_every=2,
            n_eval=2,
            max_tokens=8,
            run_nll_evaluator=False,
        )
    )


if __name__ == "__main__":
    main(*sys.argv[1:4])
