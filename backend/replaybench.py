"""What a click costs when it lands on another replica: replay against a cached session.

    python -m backend.replaybench [--images 3] [--clicks 5] [--json] [--checkpoint default] [--device cpu]

With several backend replicas behind a load balancer that is not sticky, a click may reach a
process that has not seen the earlier clicks of the image; it replays them from the request
(Label Studio sends every keypoint so far). For each image the standard robot user places click
after click (interactive /predict bodies as in backend.bench, over HTTP to an in-process server);
click k is sent several times:
- cached: the session holds clicks 1..k-1 (staying on one replica): one network run;
- continued (REDIS_URL set, SHARED_SESSION_KB > 0): the session dropped, its state in Redis (another
  replica that has the image decoded): the state restored, one network run;
- replay: the session and its Redis state dropped: k runs;
- cold: session, Redis state and image dropped (a replica that never saw the image): download,
  decode, k runs.
Prints ms per click number for each, and whether all masks are identical.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

from model.images import load_mask
from training.evaluation.clicker import RobotClicker
from training.evaluation.datasets import default_data_root

from .bench import answer_mask, keypoint, pct, predict_body, start_bench


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m backend.replaybench", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=str(default_data_root() / "Berkeley"))
    ap.add_argument("--images", type=int, default=3)
    ap.add_argument("--clicks", type=int, default=5)
    ap.add_argument("--checkpoint", default=None, help="default: MODEL_CHECKPOINT or 'default'")
    ap.add_argument("--device", default=None)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)

    bench = start_bench(Path(args.data), args.images, args.checkpoint, args.device, timeout=600)
    if bench is None:
        return 2
    backend, masks, images_url, post = bench.backend, bench.masks, bench.images_url, bench.post

    shared = backend.shared_prompts
    sharing = shared is not None and shared.max_session_bytes > 0
    kinds = ("cached", "continued", "replay", "cold") if sharing else ("cached", "replay", "cold")
    version = str(backend.models.base.predictor.version)
    ms: dict[str, list[list[float]]] = {k: [[] for _ in range(args.clicks)] for k in kinds}
    identical, compared = 0, 0
    for n, mpath in enumerate(masks, start=1):
        gt = load_mask(mpath)
        h, w = gt.shape
        image = f"{images_url}/{mpath.stem}.jpg"
        robot, pred, kps = RobotClicker(gt), np.zeros_like(gt), []
        for k in range(args.clicks):
            c = robot.next_click(pred)
            kps.append(keypoint(c.x, c.y, w, h, c.positive, k))
            answers = {}
            for kind in kinds:
                img = f"{image}?{kind}"          # each kind its own session (and cached image)
                if kind != "cached":
                    backend.sessions.discard(lambda key, img=img: key[1] == img)
                if kind in ("replay", "cold") and sharing:
                    shared.client.delete(shared.session_key(version, img, "image", "Object"))
                if kind == "cold":
                    backend.images.discard(lambda key, img=img: key == img)
                answer, t = post(predict_body(n, img, kps))
                ms[kind][k].append(t)
                answers[kind] = answer_mask(answer, h, w)
            pred = answers["cached"]
            compared += 1
            identical += all(np.array_equal(answers["cached"], answers[x]) for x in kinds)
    bench.close()

    report = {
        "redis_session_state": sharing,
        "device": str(backend.models.base.predictor.device),
        "torch_threads": torch.get_num_threads(),
        "images": len(masks), "clicks": args.clicks,
        "p50_ms_by_click": {kind: [round(pct(v, 50), 1) for v in ms[kind]] for kind in kinds},
        "replay_over_cached": [round(pct(ms["replay"][k], 50) / max(1e-9, pct(ms["cached"][k], 50)), 2)
                               for k in range(args.clicks)],
        "total_ms": {kind: round(float(sum(sum(v) for v in ms[kind])), 0) for kind in kinds},
        "identical_masks": f"{identical}/{compared}",
    }
    if args.json:
        print(json.dumps(report))
    else:
        print(f"ms per request by click number (p50 over {len(masks)} images; {report['device']}, "
              f"{report['torch_threads']} torch threads)")
        print("  click      " + "".join(f"{k + 1:>9d}" for k in range(args.clicks)))
        for kind in kinds:
            print(f"  {kind:10s} " + "".join(f"{v:9.0f}" for v in report["p50_ms_by_click"][kind]))
        print("  replay/cached " + " ".join(f"{v:.1f}x" for v in report["replay_over_cached"]))
        print("  total ms     " + "  ".join(f"{k} {v:.0f}" for k, v in report["total_ms"].items()))
        print(f"  masks identical ({' = '.join(kinds)}): {report['identical_masks']} requests")
    return 0


if __name__ == "__main__":
    sys.exit(main())
