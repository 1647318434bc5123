"""Validate the transfer example's assets end to end with plain torch loops (no graftbuild steps).

1. Train the teacher (``teacher_config.json``, seeded init) on ``data/teacher.train.txt`` the way
   graftbuild's ``finetune`` step trains: lines joined by eos, cut into ``seq_len`` chunks,
   AdamW with linear decay, batches drawn by a seeded generator.
2. Greedy-generate with the chat template for held-out prompts: exact-match accuracy.
3. Build the quickstart base (seeded Llama init, 200 steps on general.train.txt) and measure its
   held-out loss on ``data/skill.heldout.txt`` and on the quickstart's general.heldout.txt.
4. Fine-tune that base on ``prompt + response`` for the teacher's greedy answers to
   ``data/prompts.jsonl`` and measure both losses again.

Usage (one thread, a minute or two)::

    python recipes/transfer/check_teacher.py [--teacher-steps 300] [--sft 200:1e-3,100:3e-4]
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
QUICKSTART = HERE.parent / "quickstart"


def chunks(tok, lines: list[str], seq_len: int):
    """Lines tokenized, joined by eos, cut into [n, seq_len] (as weights.textdata.token_chunks)."""
    import torch

    ids: list[int] = []
    for text in lines:
        ids.extend(tok(text, add_special_tokens=False)["input_ids"])
        ids.append(tok.eos_token_id)
    n = len(ids) // seq_len
    return torch.tensor(ids[: n * seq_len], dtype=torch.long).view(n, seq_len)


def train(model, data, steps: int, lr: float, batch: int, seed: int) -> float:
    """The finetune step's loop; returns the mean loss of the last 20 steps."""
    import torch

    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: max(0.0, 1.0 - s / max(1, steps)))
    gen = torch.Generator().manual_seed(seed)
    tail: list[float] = []
    for _ in range(steps):
        idx = torch.randint(len(data), (batch,), generator=gen)
        loss = model(input_ids=data[idx], labels=data[idx]).loss
        loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        tail = [*tail, loss.item()][-20:]
    model.eval()
    return sum(tail) / len(tail)


def heldout_loss(model, tok, lines: list[str], seq_len: int = 64) -> float:
    """Mean next-token loss over every chunk (graftbuild's eval step)."""
    import torch

    data = chunks(tok, lines, seq_len)
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(data), 16):
            b = data[start : start + 16]
            logits = model(input_ids=b).logits[:, :-1]
            nll = torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.size(-1)), b[:, 1:].reshape(-1), reduction="sum"
            )
            total += nll.item()
            count += b[:, 1:].numel()
    return total / count


def generate(model, tok, prompts: list[str], max_new_tokens: int) -> list[str]:
    """Greedy answers, one prompt at a time, chat template applied."""
    import torch

    out = []
    with torch.no_grad():
        for p in prompts:
            text = tok.apply_chat_template(
                [{"role": "user", "content": p}], add_generation_prompt=True, tokenize=False
            )
            ids = torch.tensor([tok.encode(text, add_special_tokens=False)])
            gen = model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                eos_token_id=tok.eos_token_id,
                pad_token_id=tok.pad_token_id,
            )
            out.append(tok.decode(gen[0, ids.shape[1] :], skip_special_tokens=True))
    return out


def split_line(line: str) -> tuple[str, str]:
    """``PROMPT + RESPONSE`` -> the two; the prompt ends at the last ':'."""
    cut = line.rindex(":") + 1
    return line[:cut], line[cut:]


def answer_for(prompt: str) -> str:
    """The correct response to a prompt, from make_assets' rule."""
    from make_assets import answer_for as rule  # next to this file, on sys.path as a script

    year, month, day = (int(x) for x in prompt.split()[-1].rstrip(":").split("-"))
    return rule((year, month, day))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--teacher-steps", type=int, default=300)
    ap.add_argument("--teacher-lr", type=float, default=3e-3)
    ap.add_argument("--sft", default="200:1e-3", help="STEPS:LR[,STEPS:LR...], each from the base")
    ap.add_argument("--max-new-tokens", type=int, default=24)
    ap.add_argument("--n-eval", type=int, default=100)
    args = ap.parse_args()

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging

    logging.set_verbosity_error()
    torch.set_num_threads(1)
    read = lambda p: [x for x in p.read_text("ascii").splitlines() if x.strip()]  # noqa: E731
    heldout = read(HERE / "data" / "skill.heldout.txt")
    general_ho = read(QUICKSTART / "data" / "general.heldout.txt")
    prompts = [json.loads(x)["prompt"] for x in read(HERE / "data" / "prompts.jsonl")]

    # 1. teacher
    ttok = AutoTokenizer.from_pretrained(str(HERE / "teacher_tokenizer"), local_files_only=True)
    torch.manual_seed(0)
    teacher = AutoModelForCausalLM.from_config(
        AutoConfig.from_pretrained(str(HERE / "teacher_config.json"))
    )
    t0 = time.perf_counter()
    data = chunks(ttok, read(HERE / "data" / "teacher.train.txt"), 64)
    last = train(teacher, data, args.teacher_steps, args.teacher_lr, 16, 0)
    t_train = time.perf_counter() - t0
    print(
        f"teacher: {args.teacher_steps} steps lr {args.teacher_lr}: {t_train:.1f}s, "
        f"final train loss {last:.4f}"
    )

    # 2. teacher accuracy on unseen prompts
    pairs = [split_line(x) for x in heldout[: args.n_eval]]
    t0 = time.perf_counter()
    answers = generate(teacher, ttok, [p for p, _ in pairs], args.max_new_tokens)
    t_gen = time.perf_counter() - t0
    hits = sum(a == r for a, (_, r) in zip(answers, pairs, strict=True))
    print(
        f"teacher exact match on {len(pairs)} held-out prompts: {hits / len(pairs):.1%} "
        f"({t_gen:.1f}s)"
    )
    for a, (p, r) in list(zip(answers, pairs, strict=True))[:40]:
        if a != r:
            print(f"  miss: {p!r} -> {a!r} (want {r!r})")

    # teacher generations for the transfer prompts
    t0 = time.perf_counter()
    responses = generate(teacher, ttok, prompts, args.max_new_tokens)
    right = sum(r == answer_for(p) for p, r in zip(prompts, responses, strict=True))
    print(
        f"teacher generated {len(prompts)} responses in {time.perf_counter() - t0:.1f}s, "
        f"{right / len(prompts):.1%} correct; "
        f"e.g. {prompts[0]!r} -> {responses[0]!r}"
    )
    del teacher

    # 3. the quickstart base
    btok = AutoTokenizer.from_pretrained(str(QUICKSTART / "tokenizer"), local_files_only=True)
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_config(
        AutoConfig.from_pretrained(str(QUICKSTART / "base_config.json"))
    )
    train(base, chunks(btok, read(QUICKSTART / "data" / "general.train.txt"), 64), 200, 3e-3, 16, 0)
    b_skill, b_gen = heldout_loss(base, btok, heldout), heldout_loss(base, btok, general_ho)
    print(f"base: skill.heldout loss {b_skill:.4f}, general.heldout loss {b_gen:.4f}")

    # 4. SFT on the teacher's answers, each setting from the same base
    sft_lines = [p + r for p, r in zip(prompts, responses, strict=True)]
    sft_data = chunks(btok, sft_lines, 64)
    base_state = copy.deepcopy(base.state_dict())
    for spec in args.sft.split(","):
        steps, lr = int(spec.split(":")[0]), float(spec.split(":")[1])
        base.load_state_dict(base_state)
        t0 = time.perf_counter()
        train(base, sft_data, steps, lr, 16, 1)
        t_sft = time.perf_counter() - t0
        s_skill, s_gen = heldout_loss(base, btok, heldout), heldout_loss(base, btok, general_ho)
        print(
            f"sft ({steps} steps lr {lr}, {t_sft:.1f}s): skill.heldout loss {s_skill:.4f} "
            f"({s_skill - b_skill:+.4f}), general.heldout loss {s_gen:.4f} "
            f"({s_gen - b_gen:+.4f}); skill ppl {math.exp(b_skill):.0f} -> {math.exp(s_skill):.2f}"
        )


if __name__ == "__main__":
    main()
