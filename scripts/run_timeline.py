"""Where a tuning run's time went, per process, from the trials in its journal file.

    python scripts/run_timeline.py OUT/NVIDIA_H200/moetune-studies.journal

For each process (the `device` label of `run --devices`, else host:pid): its trials, the
studies it took part in, the time from the run's first trial to its own first and last
trial, the time its device spent in trials, and the gaps at the start of its studies (from
the end of its last trial in one study to the start of its first in the next: asking and
the first compile). Then, per batch size, which processes ran its trials. With --started
and --ended (the run's start and end, in seconds since the epoch, e.g. `date +%s.%N`): the
time before the first trial was asked, from then to the first trial done, and after the
last trial done.
"""

from __future__ import annotations

import argparse
import statistics
from collections import defaultdict

import optuna


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("journal", help="a moetune-studies.journal file")
    parser.add_argument("--started", type=float, help="when the run started, seconds since the epoch")
    parser.add_argument("--ended", type=float, help="when the run ended, seconds since the epoch")
    args = parser.parse_args()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(args.journal))
    runs = []  # (process, study name, start, end)
    first_asked = None
    for summary in optuna.get_all_study_summaries(storage, include_best_trial=False):
        study = optuna.load_study(study_name=summary.study_name, storage=storage)
        for trial in study.get_trials(deepcopy=False):
            worker = trial.user_attrs.get("worker") or {}
            if trial.datetime_start is not None and (first_asked is None or trial.datetime_start < first_asked):
                first_asked = trial.datetime_start
            if trial.user_attrs.get("status") != "measured" or trial.datetime_complete is None:
                continue
            who = worker.get("device") or f"{worker.get('host')}:{worker.get('pid')}"
            runs.append((who, summary.study_name, trial.datetime_start, trial.datetime_complete))
    if not runs:
        raise SystemExit(f"{args.journal}: no measured trials")
    origin = min(start for _, _, start, _ in runs)

    def since(moment) -> float:
        return (moment - origin).total_seconds()

    print(f"{'process':>14s} {'trials':>6s} {'studies':>7s} {'first s':>8s} {'last s':>7s} "
          f"{'study gaps s':>12s} {'median gap s':>12s}")
    by_process = defaultdict(list)
    for who, name, start, end in runs:
        by_process[who].append((start, end, name))
    for who, trials in sorted(by_process.items()):
        trials.sort()
        gaps, previous = [], None
        for start, end, name in trials:
            if previous is not None and name != previous[2]:
                gaps.append(max(0.0, (start - previous[1]).total_seconds()))
            previous = (start, end, name)
        studies = len({name for _, _, name in trials})
        print(f"{who:>14s} {len(trials):6d} {studies:7d} {since(trials[0][0]):8.1f} {since(trials[-1][1]):7.1f} "
              f"{sum(gaps):12.1f} {statistics.median(gaps) if gaps else 0.0:12.2f}")
    if args.started is not None and args.ended is not None:
        first_done = min(end for _, _, _, end in runs).timestamp()
        last_done = max(end for _, _, _, end in runs).timestamp()
        print(f"\nstart -> first trial asked {first_asked.timestamp() - args.started:.1f} s, "
              f"-> first trial done {first_done - first_asked.timestamp():.1f} s; "
              f"last trial done -> end {args.ended - last_done:.1f} s; wall {args.ended - args.started:.1f} s")
    print("\nbatch size: trials per process")
    per_batch = defaultdict(lambda: defaultdict(int))
    for who, name, _, _ in runs:
        per_batch[int(name.rsplit("/M=", 1)[1])][who] += 1
    for M in sorted(per_batch):
        print(f"{M:>7d}: " + ", ".join(f"{who} {n}" for who, n in sorted(per_batch[M].items())))


if __name__ == "__main__":
    main()
