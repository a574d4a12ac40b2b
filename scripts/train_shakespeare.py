"""Train the small character-level Shakespeare GPT that ships in models/shakespeare-char/.

A CPU-sized take on nanoGPT's `config/train_shakespeare_char.py`: same data preparation as
nanoGPT's data/shakespeare_char/prepare.py (sorted character vocabulary, 90/10 train/val split),
same model (gptexport.convert.model.GPT), AdamW with linear warmup and cosine decay, weight decay on 2-D
parameters only, gradient clipping. Writes, atomically, into --out-dir:

  ckpt.pt   nanoGPT train.py checkpoint format ('model', 'model_args', 'optimizer' (None, to keep
            the file small), 'iter_num', 'best_val_loss', 'config'), saved at each evaluation
            that improves the validation loss, fp32
  meta.pkl  {'vocab_size', 'itos', 'stoi'}, exactly as prepare.py pickles it

Usage (from the repository root):
  PYTHONPATH=. python scripts/train_shakespeare.py --max-iters 1800
"""

from __future__ import annotations

import argparse
import math
import os
import pickle
import tempfile
import time
from pathlib import Path

import torch

from gptexport.config import GPTConfig
from gptexport.convert.model import GPT

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_DATA = REPO_ROOT.parent / "shared" / "data" / "tinyshakespeare.txt"

# model (nanoGPT's model_args, minus anything gptexport adds)
N_LAYER, N_HEAD, N_EMBD, BLOCK_SIZE, BIAS, DROPOUT = 4, 4, 128, 128, False, 0.0
# optimizer and schedule
LEARNING_RATE, MIN_LR, WARMUP_ITERS = 1e-3, 1e-4, 100
WEIGHT_DECAY, BETA1, BETA2, GRAD_CLIP = 0.1, 0.9, 0.99, 1.0
EVAL_ITERS = 50  # batches per split in each loss estimate


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=DEFAULT_DATA, help="tinyshakespeare input.txt")
    p.add_argument("--out-dir", type=Path, default=REPO_ROOT / "models" / "shakespeare-char")
    p.add_argument("--max-iters", type=int, default=1800)
    p.add_argument("--eval-interval", type=int, default=300)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    return p.parse_args()


# -----------------------------------------------------------------------------
# data


def build_vocab(text: str) -> tuple[dict[str, int], dict[int, str]]:
    """stoi and itos exactly as nanoGPT's data/shakespeare_char/prepare.py builds them."""
    chars = sorted(list(set(text)))
    stoi = {ch: i for i, ch in enumerate(chars)}
    itos = {i: ch for i, ch in enumerate(chars)}
    return stoi, itos


def load_data(path: Path) -> tuple[torch.Tensor, torch.Tensor, dict[str, int], dict[int, str]]:
    """(train ids, val ids, stoi, itos): the first 90% of the text trains, the last 10% validates."""
    text = path.read_text(encoding="utf-8")
    stoi, itos = build_vocab(text)
    ids = torch.tensor([stoi[c] for c in text], dtype=torch.long)
    n = int(len(ids) * 0.9)
    return ids[:n], ids[n:], stoi, itos


def get_batch(data: torch.Tensor, batch_size: int, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    ix = torch.randint(len(data) - block_size, (batch_size,))
    x = torch.stack([data[i:i + block_size] for i in ix])
    y = torch.stack([data[i + 1:i + 1 + block_size] for i in ix])
    return x, y


# -----------------------------------------------------------------------------
# optimization


def configure_optimizer(model: GPT) -> torch.optim.AdamW:
    """AdamW with weight decay on the 2-D parameters (matmul weights, embeddings) only."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": WEIGHT_DECAY},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=LEARNING_RATE, betas=(BETA1, BETA2))


def get_lr(it: int, decay_iters: int) -> float:
    """nanoGPT's schedule: linear warmup, then cosine decay from LEARNING_RATE to MIN_LR."""
    if it < WARMUP_ITERS:
        return LEARNING_RATE * (it + 1) / (WARMUP_ITERS + 1)
    if it > decay_iters:
        return MIN_LR
    ratio = (it - WARMUP_ITERS) / max(1, decay_iters - WARMUP_ITERS)
    coeff = 0.5 * (1.0 + math.cos(math.pi * ratio))  # 1 -> 0
    return MIN_LR + coeff * (LEARNING_RATE - MIN_LR)


@torch.no_grad()
def estimate_loss(model: GPT, splits: dict[str, torch.Tensor], batch_size: int) -> dict[str, float]:
    """Mean loss over EVAL_ITERS random batches of each split."""
    model.eval()
    out = {}
    for name, data in splits.items():
        losses = torch.zeros(EVAL_ITERS)
        for k in range(EVAL_ITERS):
            x, y = get_batch(data, batch_size, model.config.block_size)
            _, loss = model(x, y)
            losses[k] = loss.item()
        out[name] = losses.mean().item()
    model.train()
    return out


# -----------------------------------------------------------------------------
# output


def atomic_write(path: Path, write) -> None:
    """Call write(file) on a temp file in path's directory, then os.replace it onto path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), 0o644)  # mkstemp creates 0600
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def save_checkpoint(path: Path, model: GPT, model_args: dict, iter_num: int, best_val_loss: float,
                    config: dict) -> None:
    """nanoGPT train.py's checkpoint dict, fp32, without optimizer state."""
    checkpoint = {
        "model": {k: v.detach().float() for k, v in model.state_dict().items()},
        "model_args": model_args,
        "optimizer": None,
        "iter_num": iter_num,
        "best_val_loss": float(best_val_loss),
        "config": config,
    }
    atomic_write(path, lambda f: torch.save(checkpoint, f))


def save_meta(path: Path, stoi: dict[str, int], itos: dict[int, str]) -> None:
    meta = {"vocab_size": len(stoi), "itos": itos, "stoi": stoi}
    atomic_write(path, lambda f: pickle.dump(meta, f))


def sample_from_checkpoint(ckpt_path: Path, meta_path: Path, seed: int, max_new_tokens: int = 200) -> str:
    """Reload the saved files (strictly, as a user would) and sample from "\\n"."""
    checkpoint = torch.load(ckpt_path, map_location="cpu", weights_only=True)
    with open(meta_path, "rb") as f:
        meta = pickle.load(f)
    model = GPT(GPTConfig(**checkpoint["model_args"]))
    model.load_state_dict(checkpoint["model"], strict=True)
    model.eval()
    torch.manual_seed(seed)
    idx = torch.tensor([[meta["stoi"]["\n"]]], dtype=torch.long)
    out = model.generate(idx, max_new_tokens=max_new_tokens, temperature=0.8, top_k=200)
    return "".join(meta["itos"][i] for i in out[0].tolist())


# -----------------------------------------------------------------------------


def train(args: argparse.Namespace) -> None:
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    train_data, val_data, stoi, itos = load_data(args.data)
    splits = {"train": train_data, "val": val_data}
    print(f"vocab {len(stoi)}, {len(train_data):,} train / {len(val_data):,} val characters")

    model_args = dict(n_layer=N_LAYER, n_head=N_HEAD, n_embd=N_EMBD, block_size=BLOCK_SIZE,
                      bias=BIAS, vocab_size=len(stoi), dropout=DROPOUT)
    model = GPT(GPTConfig(**model_args))
    model.train()
    print(f"{model.get_num_params() / 1e6:.2f}M parameters")
    optimizer = configure_optimizer(model)
    config = dict(dataset="shakespeare_char", data=str(args.data), out_dir=str(args.out_dir),
                  batch_size=args.batch_size, max_iters=args.max_iters, lr_decay_iters=args.max_iters,
                  eval_interval=args.eval_interval, eval_iters=EVAL_ITERS, learning_rate=LEARNING_RATE,
                  min_lr=MIN_LR, warmup_iters=WARMUP_ITERS, weight_decay=WEIGHT_DECAY, beta1=BETA1,
                  beta2=BETA2, grad_clip=GRAD_CLIP, seed=args.seed, device="cpu", dtype="float32",
                  **model_args)

    ckpt_path, meta_path = args.out_dir / "ckpt.pt", args.out_dir / "meta.pkl"
    save_meta(meta_path, stoi, itos)
    best_val_loss = float("inf")
    t_start, step_time = time.time(), 0.0
    for iter_num in range(args.max_iters + 1):
        lr = get_lr(iter_num, args.max_iters)
        for group in optimizer.param_groups:
            group["lr"] = lr

        if iter_num % args.eval_interval == 0 or iter_num == args.max_iters:
            losses = estimate_loss(model, splits, args.batch_size)
            print(f"step {iter_num}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}, "
                  f"elapsed {time.time() - t_start:.0f}s", flush=True)
            if losses["val"] < best_val_loss:
                best_val_loss = losses["val"]
                save_checkpoint(ckpt_path, model, model_args, iter_num, best_val_loss, config)
                print(f"saved checkpoint to {ckpt_path}", flush=True)
        if iter_num == args.max_iters:
            break

        t0 = time.time()
        x, y = get_batch(train_data, args.batch_size, BLOCK_SIZE)
        _, loss = model(x, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), GRAD_CLIP)
        optimizer.step()
        step_time += time.time() - t0

        if iter_num % 50 == 0:
            print(f"iter {iter_num}: loss {loss.item():.4f}, lr {lr:.2e}, "
                  f"{step_time * 1000 / (50 if iter_num else 1):.0f}ms/iter", flush=True)
            step_time = 0.0

    print(f"done: {args.max_iters} iterations in {time.time() - t_start:.0f}s, "
          f"best val loss {best_val_loss:.4f}")
    print("sample:\n" + sample_from_checkpoint(ckpt_path, meta_path, args.seed))


if __name__ == "__main__":
    train(parse_args())
