"""Where a GPU training step goes, the plain stack's against qlora's: torch's profiler over the same
steps of each side (its own process), and the kernels and ops by time, side by side.

usage: python bench/gpu_profile.py --plain PATH/TO/plain_stack_gpu.py [--case tl-bf16-ckpt]
                                   [--steps 2] [--set train.optim=adamw_torch_fused ...]
                                   [--out bench/results/gpu_profile.json]
       python bench/gpu_profile.py --tiny    # qlora's side only, on a tiny shape: checks the pipeline on CPU

Each side trains as bench/gpu_speed.py runs it (the shared script's own case; qlora on the same
model and token ids) and is profiled from the start of step 6 to the end of step 5 + --steps,
after the shared script's 4 warm-up steps. The profiler slows both sides, so the tokens/s to
quote stay gpu_speed.py's; this tells where a gap between them comes from: the time of each
profiled step, how much of it the GPU was busy (kernel time over wall time: a step that waits on
the host shows as idle GPU time), the peak memory, and the ops and kernels that take more time on
one side (in the JSON also the memory each op leaves allocated).
"""
import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from gpu_speed import CASES, load_plain, ours_case, run

FIRST = 6  # the first profiled step: after the 4 warm-up steps and one more


def profile_steps(first: int, steps: int, store: dict) -> None:
    """Profiles steps first .. first + steps - 1 of whatever Trainer runs next in this process, by
    wrapping transformers' callback handler, which every Trainer (TRL's, qlora's) calls at each step."""
    import torch
    from torch.profiler import ProfilerActivity, profile
    from transformers.trainer_callback import CallbackHandler

    begin, end = CallbackHandler.on_step_begin, CallbackHandler.on_step_end
    cuda = torch.cuda.is_available()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])

    def sync():
        if cuda:
            torch.cuda.synchronize()

    def on_step_begin(self, args, state, control, **kw):
        if state.global_step + 1 == first:  # global_step counts the finished steps
            sync()
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            store["profiler"] = profile(activities=activities, profile_memory=True)
            store["profiler"].__enter__()
            store["start"] = time.perf_counter()
        return begin(self, args, state, control, **kw)

    def on_step_end(self, args, state, control, **kw):
        if state.global_step == first + steps - 1 and "profiler" in store:
            sync()
            seconds = time.perf_counter() - store["start"]
            prof = store.pop("profiler")
            prof.__exit__(None, None, None)
            store["table"] = summary(prof, steps, seconds)
            store["table"]["peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 3) if cuda else None
        return end(self, args, state, control, **kw)

    CallbackHandler.on_step_begin, CallbackHandler.on_step_end = on_step_begin, on_step_end


def summary(prof, steps: int, seconds: float, top: int = 60) -> dict:
    """Per profiled step: wall time, kernel time, and the ops and kernels with the most self time
    (ms), on the device (kernels) or the host (ops)."""
    events = prof.key_averages()
    device = sum(e.self_device_time_total for e in events) / 1e3 / steps
    by_device = sorted(events, key=lambda e: e.self_device_time_total, reverse=True)[:top]
    by_host = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:top]
    rows = by_device + [e for e in by_host if e not in by_device]
    return dict(step_ms=round(seconds * 1e3 / steps, 2), device_busy_ms=round(device, 2),
                device_busy_share=round(device / (seconds * 1e3 / steps), 3),
                host_ms=round(sum(e.self_cpu_time_total for e in events) / 1e3 / steps, 2),
                ops=[dict(name=e.key[:120], calls=round(e.count / steps, 1),
                          device_ms=round(e.self_device_time_total / 1e3 / steps, 3),
                          host_ms=round(e.self_cpu_time_total / 1e3 / steps, 3),
                          # memory the op allocated less what it freed, per step (MiB): what it leaves held
                          device_mib=round(e.self_device_memory_usage / 2**20 / steps, 1),
                          host_mib=round(e.self_cpu_memory_usage / 2**20 / steps, 1)) for e in rows])


def child(a) -> None:
    store = {}
    profile_steps(FIRST, a.steps, store)
    with tempfile.TemporaryDirectory() as tmp:
        if a.side == "plain":
            load_plain(a.plain).run_case(a.case)
        else:
            ours_case(a.case, a.plain, a.tiny, Path(tmp), a.set)
    print("PROFILE " + json.dumps(store.get("table", {"error": "the profiled steps were not reached"})), flush=True)


def compare(sides: dict, top: int = 30) -> None:
    """Prints each side's step, then the ops and kernels with the most time per step on either side:
    by device time on a GPU (where the ops' own rows hold host time and their kernels device time),
    by host time on a CPU."""
    for name, s in sides.items():
        if "error" in s:
            print(f"{name}: ERROR {s['error']}")
        else:
            print(f"{name:6} step {s['step_ms']:9.1f} ms, device busy {s['device_busy_ms']:9.1f} ms "
                  f"({100 * s['device_busy_share']:.0f}%), host ops {s['host_ms']:9.1f} ms, "
                  f"peak {s['peak_gib']} GiB")
    per = {k: {o["name"]: o for o in s["ops"]} for k, s in sides.items() if "error" not in s}
    key = "device_ms" if any(s.get("device_busy_ms") for s in sides.values()) else "host_ms"
    names = sorted({n for ops in per.values() for n in ops},
                   key=lambda n: -max(ops.get(n, {}).get(key, 0) for ops in per.values()))[:top]
    print(f"\n{key.replace('_', ' ')} per step, calls per step:")
    print("".join(f"{k:>10} {'calls':>7}" for k in per) + "   op or kernel")
    for n in names:
        print("".join(f"{ops.get(n, {}).get(key, 0):10.2f} {ops.get(n, {}).get('calls', 0):7}"
                      for ops in per.values()) + f"   {n[:100]}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--plain", help="path to shared/bench/plain_stack_gpu.py")
    ap.add_argument("--case", default="tl-bf16-ckpt", choices=[c for c in CASES if not CASES[c][4]])
    ap.add_argument("--steps", type=int, default=2, help="steps profiled, from step 6 (at most 11)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="an override for qlora's side")
    ap.add_argument("--out", default="bench/results/gpu_profile.json")
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--child", action="store_true")
    ap.add_argument("--side")
    a = ap.parse_args()
    if not 1 <= a.steps <= 11:
        raise SystemExit("--steps: 1 to 11 (the runs have 16 steps, and the profile starts at step 6)")
    if a.child:
        return child(a)
    me = [sys.executable, __file__, "--child", "--steps", str(a.steps), "--case", a.case,
          *(f"--set={x}" for x in a.set)]
    if a.tiny:
        sides = {"qlora": run(me + ["--tiny", "--side", "qlora"], "PROFILE ")}
    elif not a.plain:
        raise SystemExit("give --plain PATH/TO/plain_stack_gpu.py (shared/bench), or --tiny")
    else:
        sides = {side: run(me + ["--plain", a.plain, "--side", side], "PROFILE ") for side in ("plain", "qlora")}
    compare(sides)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(dict(case=a.case, steps=a.steps, first_step=FIRST, overrides=a.set,
                                           sides=sides), indent=2) + "\n")


if __name__ == "__main__":
    main()
