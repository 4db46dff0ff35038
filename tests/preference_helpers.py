"""Shared pieces of the preference tests: a pairwise set whose chosen and rejected replies differ learnably, and the
argument list of a short CPU preference run."""

from pathlib import Path

from train_helpers import PROMPTS, run_arguments

# Chosen replies are Chinese product descriptions, rejected ones English sentences: a difference a tiny model learns
# in a few steps, and which held-out prompts share.
GOOD_REPLIES = [
    "这款红色连衣裙采用棉面料，宽松的版型穿着舒适透气。",
    "复古的条纹设计，适合周末逛街。",
    "白色上衣很好地修饰身材。",
    "休闲的格子外套，适合上班通勤。",
]
BAD_REPLIES = [
    "Our new blue jacket is made of soft cotton.",
    "The temperature in Beijing is 20 degrees.",
    "Please write a short advertisement for this product.",
    "What is the weather like in Beijing today?",
]
HELD_OUT_PROMPTS = ["类型#裙*材质#棉*风格#休闲", "类型#上衣*颜色#黑色*图案#条纹", "类型#外套*风格#复古", "类型#裤*颜色#白色"]


def preference_pairs(prompts: list[str], count: int, conversations: bool = True) -> list[dict]:
    """`count` pairs over `prompts`: chosen a Chinese description, rejected an English sentence."""
    pairs = []
    for index in range(count):
        prompt = prompts[index % len(prompts)]
        good, bad = GOOD_REPLIES[index % len(GOOD_REPLIES)], BAD_REPLIES[(index + 1) % len(BAD_REPLIES)]
        if conversations:
            pairs.append({"conversations": [{"role": "user", "content": prompt}], "chosen": good, "rejected": bad})
        else:
            pairs.append({"prompt": prompt, "chosen": good, "rejected": bad})
    return pairs


def training_pairs(count: int = 8) -> list[dict]:
    """Training pairs over the fixed prompts."""
    return preference_pairs(PROMPTS, count)


def held_out_pairs() -> list[dict]:
    """Pairs over prompts the training pairs do not have."""
    return preference_pairs(HELD_OUT_PROMPTS, 8)


def preference_arguments(
    model_dir: Path, train_file: Path, output_dir: Path, cache_dir: Path, **overrides
) -> list[str]:
    """Arguments of a short fp32 CPU preference run (LoRA rank 4 unless overridden)."""
    settings = {"lora_rank": 4, "max_seq_length": 128, "max_steps": 6, "save_steps": 6, "learning_rate": 2e-2,
                "lora_dropout": 0.0, "max_source_length": None, "max_target_length": None}  # fmt: skip
    settings.update(overrides)
    return run_arguments(model_dir, train_file, output_dir, cache_dir, **settings)
