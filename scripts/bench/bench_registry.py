"""What a recorded, locked champion move costs over a bare MLflow alias set.

    python scripts/bench/bench_registry.py                      # SQLite store in a temp dir
    python scripts/bench/bench_registry.py --uri http://127.0.0.1:5000 --moves 50

Baseline (same run, same store): `MlflowClient.set_registered_model_alias` alone. Measured:
`Registry.promote` (lock create/delete, fresh read, version tags, history tag, alias),
`Registry.history()` after all moves, and `register_candidate` (transformers flavour save
+ upload + version) for a tiny GPT-2. Writes bench-results/registry.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests"))  # fixture builders: a tiny model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--uri", default=None, help="tracking URI (default: SQLite in a temp dir)")
    ap.add_argument("--moves", type=int, default=30)
    ap.add_argument("--out", type=Path, default=REPO / "bench-results" / "registry.json")
    args = ap.parse_args()

    from fixtures_models import fresh_model, save_model, split_paragraphs, train_tokenizer

    from flywheel.config import Profile
    from flywheel.registry import Registry, lineage_tags

    with tempfile.TemporaryDirectory() as tmp:
        registry = {"model_name": f"bench-{int(time.time())}"}
        if args.uri:
            registry["tracking_uri"] = args.uri
        reg = Registry(Profile(state_dir=str(Path(tmp) / "state"), registry=registry))
        tok = train_tokenizer(split_paragraphs()[0])
        model_dir = save_model(fresh_model(tok), tok, Path(tmp) / "m")
        reg.register_candidate(model_dir, tags=lineage_tags(data_hash="x"), model_card="# warm")
        t0 = time.perf_counter()
        reg.register_candidate(model_dir, tags=lineage_tags(data_hash="x"), model_card="# b")
        register_s = time.perf_counter() - t0

        client = reg._client
        bare, ours = [], []
        for i in range(args.moves):
            version = "1" if i % 2 else "2"
            t0 = time.perf_counter()
            client.set_registered_model_alias(reg.name, "bench-bare", version)
            bare.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            reg.promote(version, reason=f"bench {i}", actor="bench")
            ours.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        n_hist = len(reg.history())
        history_s = time.perf_counter() - t0
        uri = reg.uri

    rows = [
        ("bare set_registered_model_alias", statistics.median(bare)),
        ("Registry.promote (lock + history)", statistics.median(ours)),
    ]
    base = rows[0][1]
    print(f"\nregistry at {uri.split('?')[0][:60]}: {args.moves} moves each\n")
    print(f"{'operation':36} {'median ms':>10} {'x bare':>8}")
    for name, s in rows:
        print(f"{name:36} {s * 1000:>10.1f} {s / base:>8.1f}")
    print(f"{'history() of ' + str(n_hist) + ' entries':36} {history_s * 1000:>10.1f}")
    print(f"{'register_candidate (tiny GPT-2)':36} {register_s * 1000:>10.1f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps(
            {
                "bench": "registry",
                "store": "server" if args.uri else "sqlite",
                "moves": args.moves,
                "bare_alias_ms": base * 1000,
                "promote_ms": rows[1][1] * 1000,
                "ratio": rows[1][1] / base,
                "history_ms": history_s * 1000,
                "history_entries": n_hist,
                "register_candidate_ms": register_s * 1000,
            },
            indent=2,
        )
    )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
