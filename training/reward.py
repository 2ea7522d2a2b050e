"""Reward model: the reference's transformer with a LoRA adapter and a scalar head, trained on a snapshot.

Loss: Bradley-Terry on same-prompt pairs (``-log sigmoid(r_chosen - r_rejected)``) plus a logistic loss on
the *unpaired* thumbs (thumbs that are not already one side of a pair, so no answer counts twice). The score of
a sequence is the head applied to the hidden state of its last token (the end-of-turn token). Held-out pair
accuracy and thumb AUC are recorded. A trained reward model is pinned like a reference: the sha256 of every
file plus its lineage (snapshot hash, reference hash), so PPO can refuse one that changed or belongs to another
reference.

    train_reward(config, snapshot, reference, out_dir) -> RunResult
    pin_reward_model(out_dir, home, name) -> RewardModelInfo
    reward_model_for(reference, home) -> RewardModelInfo | None    # newest pin trained for this reference hash
    load_reward_model(info, reference, device) -> RewardModel       # re-hashed; callable as a PPO reward
    evaluate_reward(model, tokenizer, snapshot, split, config) -> dict
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from ktoloop.errors import KtoLoopError
from ktoloop.snapshot import Snapshot
from training.config import RewardConfig  # lives there: no torch to load [reward]
from training.data import Encoded, collate, completion_texts, encode_completion, render_prompt
from training.evaluate import has_split
from training.logprobs import decoder_states
from training.reference import Reference, _hash_dir, verify_pinned_dir
from training.runs import METRICS_FILE, RunResult, append_metrics, finished_run, run_meta, write_meta

HEAD_FILE = "reward_head.safetensors"
META_FILE = "reward_meta.json"
"""Its own name (not ``training_meta.json``): it tells a reward model's directory from a candidate's."""
PIN_FILE = "reward_model.json"


# ------------------------------------------------------------------------------------------------ the model

class RewardModel(torch.nn.Module):
    """Transformer + linear head on the last token's hidden state; ``score`` is a PPO reward function."""

    def __init__(self, lm, head: torch.nn.Linear, tokenizer=None, max_length: int = 512,
                 max_prompt_length: int = 256):
        super().__init__()
        self.lm, self.head, self.tokenizer = lm, head, tokenizer
        self.max_length, self.max_prompt_length = max_length, max_prompt_length

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Scores, shape (B,), of right-padded sequences."""
        hidden = decoder_states(self.lm, input_ids, attention_mask)[1]
        last = attention_mask.long().sum(1) - 1
        return self.head(hidden[torch.arange(len(hidden), device=hidden.device), last].float()).squeeze(-1)

    @torch.no_grad()
    def score(self, prompts: list[list[int]], completions: list[list[int]], batch_size: int = 16) -> torch.Tensor:
        """RewardFn: token ids of rendered prompts and generated completions -> one score each (CPU)."""
        data = Encoded(prompts, completions, False, self.max_length, self.max_prompt_length)
        pad = self.tokenizer.pad_token_id if self.tokenizer is not None else 0
        device = next(self.parameters()).device
        out = []
        for start in range(0, len(prompts), batch_size):
            batch = collate(data, [(i, i) for i in range(start, min(start + batch_size, len(prompts)))], pad, device)
            out.append(self.forward(batch.input_ids, batch.attention_mask).cpu())
        return torch.cat(out)


def bradley_terry_loss(chosen: torch.Tensor, rejected: torch.Tensor) -> torch.Tensor:
    return -F.logsigmoid(chosen - rejected)


def thumb_loss(scores: torch.Tensor, desirable: torch.Tensor) -> torch.Tensor:
    return F.binary_cross_entropy_with_logits(scores, desirable.float(), reduction="none")


# ------------------------------------------------------------------------------------------------- the data

@dataclass(frozen=True)
class RewardData:
    pairs: Encoded | None
    """Chosen i = completion i, rejected i = completion n+i (``Encoded.sequences``)."""
    thumbs: Encoded | None
    """Thumbs with labels in ``desirable``."""


def reward_data(snapshot: Snapshot, split: str, tokenizer, config: RewardConfig, unpaired_only: bool) -> RewardData:
    """Tokenise a split; ``unpaired_only`` drops thumbs whose (prompt, answer) is already one side of a pair."""
    pairs = snapshot.pairs(split) if has_split(snapshot, True, split) else None
    thumbs = snapshot.kto(split) if has_split(snapshot, False, split) else None
    if thumbs is not None and pairs is not None and unpaired_only:
        paired = {(r["prompt"], r[side]) for r in pairs.iter_rows(named=True) for side in ("chosen", "rejected")}
        keep = [(p, c) not in paired for p, c in zip(thumbs["prompt"], thumbs["completion"])]
        thumbs = thumbs.filter(keep)
    prompts: dict[str, list[int]] = {}

    def prompt(text: str) -> list[int]:
        return prompts.setdefault(text, render_prompt(tokenizer, text))

    def encode(frame, paired: bool) -> Encoded | None:
        if frame is None or frame.height == 0:
            return None
        texts, cut = completion_texts(frame, paired)
        return Encoded([prompt(p) for p in frame["prompt"]],
                       [encode_completion(tokenizer, t, c) for t, c in zip(texts, cut)],
                       paired, config.max_length, config.max_prompt_length,
                       [] if paired else [bool(x) for x in frame["label"]])

    return RewardData(encode(pairs, True), encode(thumbs, False))


# -------------------------------------------------------------------------------------------------- the step

def reward_step(model: RewardModel, optimizer, scheduler, data: RewardData, pair_rows: list[int],
                thumb_rows: list[int], config: RewardConfig, pad_id: int, device: torch.device) -> dict:
    """One optimizer step: Bradley-Terry on a batch of pairs + weighted logistic loss on a batch of thumbs."""
    model.train()
    loss = torch.zeros((), device=device)
    metrics: dict[str, float] = {}
    if pair_rows:
        batch = collate(data.pairs, data.pairs.sequences(pair_rows), pad_id, device)
        chosen, rejected = model(batch.input_ids, batch.attention_mask).chunk(2)
        pair_loss = bradley_terry_loss(chosen, rejected).mean()
        loss = loss + pair_loss
        metrics.update({"pair_loss": pair_loss.item(), "pair_accuracy": (chosen > rejected).float().mean().item(),
                        "margin": (chosen - rejected).mean().item()})
    if thumb_rows:
        batch = collate(data.thumbs, [(r, r) for r in thumb_rows], pad_id, device)
        labels = torch.tensor([data.thumbs.desirable[r] for r in thumb_rows], device=device)
        scores = model(batch.input_ids, batch.attention_mask)
        unpaired = thumb_loss(scores, labels).mean()
        loss = loss + config.unpaired_weight * unpaired
        metrics.update({"thumb_loss": unpaired.item(),
                        "thumb_accuracy": ((scores > 0) == labels).float().mean().item()})
    loss.backward()
    trainable = [p for p in model.parameters() if p.requires_grad]
    grad_norm = torch.nn.utils.clip_grad_norm_(trainable, config.max_grad_norm or float("inf"))
    lr = scheduler.get_last_lr()[0]
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return {"loss": loss.item(), **metrics, "grad_norm": float(grad_norm), "lr": lr}


# --------------------------------------------------------------------------------------------------- the run

def train_reward(config: RewardConfig, snapshot: Snapshot, reference: Reference, out_dir: str | Path) -> RunResult:
    """Train a reward model on ``snapshot``'s train split; writes the adapter, the head, metadata and metrics."""
    from training.modeling import load_model
    from training.runtime import make_trainable, setup_processes, warmup_cosine

    out_dir = Path(out_dir)
    finished_run(out_dir, resume=False, meta_file=META_FILE)  # refuses to overwrite a trained one
    reference.check_version(snapshot.manifest.model_version)
    reference.verify()
    device, _, world = setup_processes(config)
    if world > 1:
        raise KtoLoopError("reward model training runs in one process; launch it without torchrun")
    started = time.time()
    torch.manual_seed(config.seed)
    lm, tokenizer = load_model(reference.path, device=device)
    data = reward_data(snapshot, "train", tokenizer, config, unpaired_only=True)
    n_pairs, n_thumbs = (data.pairs.n if data.pairs else 0), (data.thumbs.n if data.thumbs else 0)
    if n_pairs + n_thumbs == 0:
        raise KtoLoopError(f"snapshot {snapshot.manifest.snapshot_id} has no train pairs or thumbs")
    head = torch.nn.Linear(lm.config.hidden_size, 1).to(device)
    torch.nn.init.normal_(head.weight, std=1 / (lm.config.hidden_size + 1) ** 0.5)
    torch.nn.init.zeros_(head.bias)
    model = RewardModel(make_trainable(lm, config), head, tokenizer, config.max_length, config.max_prompt_length)

    steps_per_epoch = max(1, -(-max(n_pairs, n_thumbs) // config.batch_size))
    total = config.max_steps or config.epochs * steps_per_epoch
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=config.lr,
                                  weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(0, total))
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / METRICS_FILE).unlink(missing_ok=True)
    for step in range(total):
        t0 = time.perf_counter()
        metrics = reward_step(model, optimizer, scheduler, data, _rows(n_pairs, step, config),
                              _rows(n_thumbs, step, config), config, tokenizer.pad_token_id, device)
        append_metrics(out_dir, {"step": step + 1, **metrics, "seconds": round(time.perf_counter() - t0, 4)})

    score = evaluate_reward(model, tokenizer, snapshot, "eval", config)
    model.lm.save_pretrained(out_dir)
    from safetensors.torch import save_file

    save_file({k: v.detach().cpu().contiguous() for k, v in head.state_dict().items()}, out_dir / HEAD_FILE)
    meta = run_meta(config, snapshot, reference, started, kind="reward_model", steps=total,
                    train={"pairs": n_pairs, "unpaired_thumbs": n_thumbs}, eval=score)
    return write_meta(out_dir, meta, META_FILE)


def _rows(n: int, step: int, config: RewardConfig) -> list[int]:
    """Step ``step``'s batch from a seeded permutation per pass; the shorter source cycles."""
    if n == 0:
        return []
    size = min(config.batch_size, n)
    per_pass = -(-n // size)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(config.seed * 100_003 + step // per_pass))
    first = (step % per_pass) * size
    return [order[(first + k) % n].item() for k in range(size)]


@torch.no_grad()
def evaluate_reward(model: RewardModel, tokenizer, snapshot: Snapshot, split: str, config: RewardConfig) -> dict | None:
    """Held-out pair accuracy (chosen scored above rejected) and thumb AUC / accuracy (score > 0 = thumbs up)."""
    data = reward_data(snapshot, split, tokenizer, config, unpaired_only=False)
    if data.pairs is None and data.thumbs is None:
        return None
    model.eval()
    out: dict = {"split": split}
    if data.pairs is not None:
        scores = model.score(data.pairs.prompts * 2, data.pairs.completions)
        chosen, rejected = scores.chunk(2)
        out.update(pairs=data.pairs.n, pair_accuracy=(chosen > rejected).float().mean().item(),
                   pair_margin=(chosen - rejected).mean().item())
    if data.thumbs is not None:
        scores = model.score(data.thumbs.prompts, data.thumbs.completions)
        labels = torch.tensor(data.thumbs.desirable)
        good, bad = scores[labels], scores[~labels]
        auc = (good[:, None] > bad[None, :]).float().mean().item() if len(good) and len(bad) else float("nan")
        out.update(thumbs=data.thumbs.n, thumb_auc=auc, thumb_accuracy=((scores > 0) == labels).float().mean().item(),
                   reward_desirable=good.mean().item() if len(good) else float("nan"),
                   reward_undesirable=bad.mean().item() if len(bad) else float("nan"))
    out["accuracy"] = out.get("pair_accuracy", out.get("thumb_auc"))
    return out


# ---------------------------------------------------------------------------------------------- pins, lookup

@dataclass(frozen=True)
class RewardModelInfo:
    """A pinned reward model: where it is, the sha256 of its files, and what it was trained from."""

    name: str
    path: str
    files: dict[str, str]
    reference: dict
    """{name, model_version, path, sha256} of the reference it was trained on (and must score for)."""
    snapshot: dict
    """{id, content_sha256, model_version} of its training snapshot."""
    eval: dict | None
    created_at: str

    @property
    def reference_sha256(self) -> str:
        return self.reference["sha256"]

    @property
    def sha256(self) -> str:
        return hashlib.sha256(json.dumps(self.files, sort_keys=True).encode()).hexdigest()

    def verify(self) -> None:
        verify_pinned_dir(self.path, self.files, f"reward model {self.name!r}", "retrain it with `ktoloop reward train`",
                          ignore=(METRICS_FILE,))


def reward_models_dir(home: str | Path) -> Path:
    return Path(home) / "reward_models"


def pin_reward_model(out_dir: str | Path, home: str | Path, name: str) -> RewardModelInfo:
    """Hash a trained reward model directory and record the pin under ``<home>/reward_models/<name>/``."""
    out_dir = Path(out_dir).resolve()
    meta_path = out_dir / META_FILE
    if not meta_path.is_file() or not (out_dir / HEAD_FILE).is_file():
        raise KtoLoopError(f"{out_dir} is not a trained reward model ({META_FILE} or {HEAD_FILE} missing)")
    meta = json.loads(meta_path.read_text())
    files = {k: v for k, v in _hash_dir(out_dir).items() if k != METRICS_FILE}
    info = RewardModelInfo(name=name, path=str(out_dir), files=files, reference=meta["reference"],
                           snapshot=meta["snapshot"], eval=meta.get("eval"),
                           created_at=dt.datetime.now(dt.timezone.utc).isoformat())
    pin_dir = reward_models_dir(home) / name
    pin_dir.mkdir(parents=True, exist_ok=True)
    tmp = pin_dir / (PIN_FILE + ".tmp")
    tmp.write_text(json.dumps(asdict(info), indent=2, sort_keys=True))
    tmp.replace(pin_dir / PIN_FILE)
    return info


def list_reward_models(home: str | Path) -> list[RewardModelInfo]:
    root = reward_models_dir(home)
    infos = []
    for path in sorted(root.glob(f"*/{PIN_FILE}")) if root.is_dir() else []:
        try:
            infos.append(RewardModelInfo(**json.loads(path.read_text())))
        except (json.JSONDecodeError, TypeError) as exc:
            raise KtoLoopError(f"reward model pin {path} is invalid: {exc}") from exc
    return infos


def load_reward_pin(name: str, home: str | Path) -> RewardModelInfo:
    for info in list_reward_models(home):
        if info.name == name:
            return info
    raise KtoLoopError(f"no pinned reward model {name!r} under {reward_models_dir(home)}; train one with "
                       f"`ktoloop reward train --snapshot ID`")


def reward_model_for(reference: Reference, home: str | Path) -> RewardModelInfo | None:
    """The newest pinned reward model trained on exactly this reference (by hash), or None.

    Cheap (reads pins, hashes nothing): eligibility calls it; ``load_reward_model`` re-hashes before use.
    """
    matches = [i for i in list_reward_models(home) if i.reference_sha256 == reference.sha256]
    return max(matches, key=lambda i: (i.created_at, i.name)) if matches else None


def load_reward_model(info: RewardModelInfo, reference: Reference, device: torch.device | str = "cpu") -> RewardModel:
    """Re-hash the pin and its reference, then load base + merged adapter + head, in eval mode."""
    from safetensors.torch import load_file

    from training.modeling import load_model

    if info.reference_sha256 != reference.sha256:
        raise KtoLoopError(f"reward model {info.name!r} was trained on reference {info.reference['name']!r} "
                           f"(sha256 {info.reference_sha256[:12]}...), not on {reference.name!r} "
                           f"({reference.sha256[:12]}...); train one for this reference")
    info.verify()
    reference.verify()
    lm, tokenizer = load_model(reference.path, adapter_dir=info.path, device=device)
    head_state = load_file(Path(info.path) / HEAD_FILE)
    head = torch.nn.Linear(head_state["weight"].shape[1], 1)
    head.load_state_dict(head_state)
    config = json.loads((Path(info.path) / META_FILE).read_text())["config"]
    model = RewardModel(lm, head.to(device), tokenizer, config["max_length"], config["max_prompt_length"])
    model.requires_grad_(False)
    return model.eval()
