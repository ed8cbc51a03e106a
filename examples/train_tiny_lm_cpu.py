"""Train a tiny next-token model on CPU with fastloss.torch.cross_entropy and with
torch.nn.functional.cross_entropy, from the same seed, and compare the loss curves.

The data is synthetic text made in this script: a random sparse bigram "language" over
``--vocab`` tokens (each token has a few likely successors), so the model has something to
learn.  The model is an embedding of the previous two tokens -> MLP -> vocabulary logits.
Both runs start from identical weights and see identical batches; only the loss function
differs.  The script prints both loss curves side by side, the largest difference, and the
median step time of each, and exits with status 1 if the curves differ by more than 1e-5.

    python examples/train_tiny_lm_cpu.py --steps 200 --vocab 2000 --threads 2
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch
import torch.nn.functional as F

import fastloss.torch as flt

TOLERANCE = 1e-5


def make_corpus(vocab: int, length: int, seed: int) -> torch.Tensor:
    """A token stream from a random sparse bigram model (4 successors per token, Zipf-like weights)."""
    g = torch.Generator().manual_seed(seed)
    successors = torch.randint(0, vocab, (vocab, 4), generator=g)
    probs = torch.tensor([0.55, 0.25, 0.15, 0.05])
    choice = torch.multinomial(probs, length, replacement=True, generator=g)
    noise = torch.rand(length, generator=g) < 0.05          # 5 % uniformly random tokens
    random_tokens = torch.randint(0, vocab, (length,), generator=g)
    succ, ch, rnd, nz = successors.tolist(), choice.tolist(), random_tokens.tolist(), noise.tolist()
    out = []
    tok = 0
    for i in range(length):
        tok = rnd[i] if nz[i] else succ[tok][ch[i]]
        out.append(tok)
    out = torch.tensor(out, dtype=torch.int64)
    return out


class TinyLM(torch.nn.Module):
    def __init__(self, vocab: int, dim: int = 64, hidden: int = 256):
        super().__init__()
        self.emb = torch.nn.Embedding(vocab, dim)
        self.mlp = torch.nn.Sequential(torch.nn.Linear(2 * dim, hidden), torch.nn.GELU())
        self.head = torch.nn.Linear(hidden, vocab)

    def forward(self, prev2: torch.Tensor) -> torch.Tensor:          # (B, 2) -> (B, V)
        return self.head(self.mlp(self.emb(prev2).flatten(1)))


class Run:
    """One training run: a model, its optimizer and its batch stream, all from `seed`."""

    def __init__(self, loss_fn, vocab: int, seed: int, hidden: int):
        torch.manual_seed(seed)
        self.loss_fn = loss_fn
        self.model = TinyLM(vocab, hidden=hidden)
        self.opt = torch.optim.SGD(self.model.parameters(), lr=0.5, momentum=0.9)
        self.gen = torch.Generator().manual_seed(seed + 1)
        self.losses, self.times = [], []

    def step(self, corpus: torch.Tensor, batch: int):
        idx = torch.randint(2, len(corpus), (batch,), generator=self.gen)
        prev2 = torch.stack([corpus[idx - 2], corpus[idx - 1]], 1)
        target = corpus[idx]
        t0 = time.perf_counter()
        logits = self.model(prev2)
        loss = self.loss_fn(logits, target)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        self.times.append(time.perf_counter() - t0)
        self.losses.append(loss.detach().item())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--vocab", type=int, default=2000)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch and fastloss threads (default 1: on a loaded machine, spinning OpenMP workers "
                         "make multi-threaded steps of this tiny model up to 10x slower; 0 = torch's default)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    corpus = make_corpus(args.vocab, 10000, args.seed)
    # the same initial weights and batches for both; steps interleaved so both see the same machine load
    ours = Run(flt.cross_entropy, args.vocab, args.seed, args.hidden)
    ref = Run(F.cross_entropy, args.vocab, args.seed, args.hidden)
    for _ in range(args.steps):
        ours.step(corpus, args.batch)
        ref.step(corpus, args.batch)
    lf, tf, lt, tt = ours.losses, ours.times, ref.losses, ref.times
    print(f"tiny LM: vocab {args.vocab}, batch {args.batch}, {args.steps} steps, "
          f"{torch.get_num_threads()} threads")
    print(f"{'step':>6} {'fastloss':>12} {'torch':>12} {'|diff|':>10}")
    every = max(1, args.steps // 20)
    for i in range(args.steps):
        if i % every == 0 or i == args.steps - 1:
            print(f"{i:>6} {lf[i]:>12.6f} {lt[i]:>12.6f} {abs(lf[i] - lt[i]):>10.2e}")
    diff = max(abs(a - b) for a, b in zip(lf, lt))
    print(f"max |loss difference| over {args.steps} steps: {diff:.3e} (tolerance {TOLERANCE:g})")
    print(f"median step time: fastloss {statistics.median(tf) * 1e3:.2f} ms, "
          f"torch {statistics.median(tt) * 1e3:.2f} ms")
    if diff > TOLERANCE:
        print("FAILED: the loss curves differ", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
