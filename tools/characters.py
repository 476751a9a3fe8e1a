"""The text notebooks 7 and 9 train their character-level GPTs on: the repository's own README,
minimal_flash.py, bench.py and kernels/*.cu, one token per character."""
from dataclasses import dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Characters:
    files: list        # the files read, in order
    text: str          # all of them, one after the other
    chars: list        # the vocabulary: every distinct character, sorted; a token is an index into it
    index: dict        # character -> token
    train_data: torch.Tensor  # the first 90% of the tokens
    val_data: torch.Tensor    # the rest, held out


def characters():
    files = [ROOT / "README.md", ROOT / "minimal_flash.py", ROOT / "bench.py", *sorted((ROOT / "kernels").glob("*.cu"))]
    text = "\n".join(path.read_text() for path in files)
    chars = sorted(set(text))
    index = {c: i for i, c in enumerate(chars)}
    data = torch.tensor([index[c] for c in text])
    split = int(0.9 * len(data))
    return Characters(files, text, chars, index, data[:split], data[split:])


def batches(data, steps, batch, context, seed, device="cpu"):
    """The same sequence of (input, target) batches for every run with this seed: `batch` windows of
    `context` tokens at random starts, the target each window shifted by one."""
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        start = torch.randint(len(data) - context - 1, (batch,), generator=generator).tolist()
        x = torch.stack([data[s:s + context] for s in start])
        y = torch.stack([data[s + 1:s + context + 1] for s in start])
        yield x.to(device), y.to(device)
