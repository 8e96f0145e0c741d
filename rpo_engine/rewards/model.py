"""A learned reward: a Hugging Face sequence-classification model scoring each prompt + completion.

TRL's GRPOTrainer takes a model among its `reward_funcs`; this is that, called the way TRL calls it:
a string prompt is joined to its completion as text, a conversation gets the completion as its assistant
turn through the reward model's own chat template; the batch is tokenized without special tokens, padded
on the right, and each row's first logit is its reward. The model reads its own tokenizer, so it need
not share the policy's vocabulary.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from rpo_engine.errors import UserError


def reward_model_directory(name: str) -> Path | None:
    """The model directory a --reward entry names (a config.json inside), a Hub model id's (`org/name`, as TRL's
    reward_funcs take it) snapshot in the cache, downloaded first where needed; None: the entry is no model."""
    from rpo_engine.model.checkpoint import model_directory

    directory = model_directory(name)
    return directory if (directory / "config.json").is_file() else None


class RewardModel:
    """`score(texts, rows)` -> one float per completion (TRLStyleReward's interface). Runs without gradient
    in batches of `batch_size` rows, on `device` in `dtype` (bf16 on a GPU, as the policy)."""

    def __init__(self, path: str, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                 batch_size: int = 32, progress: bool = True, directory: Path | None = None):
        """path: a directory or Hub id; directory: where it was found already (reward_model_directory), so that
        a Hub id is not looked up twice (online, a request each)."""
        from safetensors import SafetensorError
        from transformers import AutoModelForSequenceClassification, AutoTokenizer
        from transformers.utils import logging as hf_logging

        from rpo_engine.model.checkpoint import model_directory

        if directory is None:
            directory = model_directory(path)  # a Hub id: its snapshot in the cache
        try:
            config = json.loads((directory / "config.json").read_text())
        except (OSError, ValueError) as e:
            raise UserError(f"{directory / 'config.json'}: not a readable model config ({e})") from None
        if not isinstance(config, dict):
            raise UserError(f"{directory / 'config.json'}: not a readable model config (a JSON "
                            f"{type(config).__name__}, expected an object)")
        if not any(a.endswith("ForSequenceClassification") for a in config.get("architectures") or []):
            raise UserError(f"reward model {path!r}: its config.json names {config.get('architectures')}, "
                            f"not a *ForSequenceClassification model (a reward model has a scalar head)")
        bars = hf_logging.is_progress_bar_enabled()
        if not progress:  # --no-progress: transformers' "Loading weights" bar too
            hf_logging.disable_progress_bar()
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(str(directory))
            self.model = AutoModelForSequenceClassification.from_pretrained(str(directory), dtype=dtype)
        except (OSError, ValueError, RuntimeError, SafetensorError) as e:  # a truncated file; a head of another shape
            raise UserError(f"reward model {path!r}: cannot load ({' '.join(str(e).split())[:200]})") from None
        finally:
            if bars:
                hf_logging.enable_progress_bar()
        # without tokenizer files transformers 5 makes an empty tokenizer, and the first scoring (a training step
        # in) failed inside the model; what a file holds is the tokenizer's own business (BERT's vocab.txt, spm.model)
        if not self.tokenizer("a", add_special_tokens=False)["input_ids"]:
            raise UserError(f"reward model {path!r}: its tokenizer encodes no text (no tokenizer files in {directory}?)")
        if self.tokenizer.pad_token is None:  # Llama's: padding on the right is never read
            self.tokenizer.pad_token = self.tokenizer.eos_token
        if self.model.config.pad_token_id is None:  # the head pools each row's last token before padding
            self.model.config.pad_token_id = self.tokenizer.pad_token_id
        self.model.to(device).eval().requires_grad_(False)
        self.device, self.batch_size, self.path = torch.device(device), batch_size, path
        # the metric's name: rewards/<name>/mean (TRL: the model's); a Hub id's name, not its snapshot's hash
        self.__name__ = (directory.resolve() if directory == Path(path) else Path(path)).name

    def texts(self, completions: list[str], rows: list[dict]) -> list[str]:
        """What the reward model reads: prompt + completion, a conversation through its chat template."""
        from jinja2.exceptions import TemplateError

        out = []
        for text, row in zip(completions, rows):
            prompt = row["prompt"]
            if isinstance(prompt, str):
                out.append(prompt + text)
                continue
            try:
                out.append(self.tokenizer.apply_chat_template(
                    [*prompt, {"role": "assistant", "content": text}], tokenize=False))
            except (TemplateError, ValueError) as e:  # the template's raise_exception (no system role, say)
                raise UserError(f"reward model {self.path!r}: its chat template cannot render the conversation of "
                                f"row {row.get('id')!r} ({' '.join(str(e).split())[:200]})") from None
        return out

    @torch.no_grad()
    def score(self, texts: list[str], rows: list[dict], completion_ids=None, none_as_nan: bool = False) -> list[float]:
        inputs, scores = self.texts(texts, rows), []
        for start in range(0, len(inputs), self.batch_size):
            batch = self.tokenizer(inputs[start:start + self.batch_size], return_tensors="pt", padding=True,
                                   padding_side="right", add_special_tokens=False).to(self.device)
            scores += self.model(**batch).logits[:, 0].float().tolist()  # [b]
        for score, row in zip(scores, rows):  # else NaN advantages: every update skipped, with only a warning
            if not math.isfinite(score):
                raise UserError(f"reward model {self.path!r}: score {score} for row {row.get('id')!r} (not finite: "
                                f"its weights, or its activations in {self.model.dtype}, overflow)")
        return scores
