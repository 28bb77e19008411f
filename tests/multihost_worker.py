"""One process of a multi-process test run: `python tests/multihost_worker.py ROWS_FILE|- jaxalign-args...`.

Runs the `jaxalign` CLI in this process (the caller sets JAX_PLATFORMS, XLA_FLAGS and the
JAXALIGN_COORDINATOR / _NUM_PROCESSES / _PROCESS_ID variables). With a ROWS_FILE, every
training batch this process materializes is appended to it as one JSON line: the
process index and the dataset indices of the rows it fed (to check the data slicing).
"""

import json
import sys


def record_rows(path: str) -> None:
    from jaxalign.data.batching import BatchIterator

    original = BatchIterator._materialize

    def materialize(self, batch):
        if self.shuffle:  # the training iterator (eval iterators do not shuffle)
            lo = self.process_index * self.local_batch_size
            rows = [list(map(int, row)) for row in batch[lo: lo + self.local_batch_size]]
            with open(path, "a") as f:
                f.write(json.dumps({"process": self.process_index, "count": self.process_count,
                                    "epoch": self.epoch, "step": self.step, "rows": rows}) + "\n")
        return original(self, batch)

    BatchIterator._materialize = materialize


if __name__ == "__main__":
    rows_file, args = sys.argv[1], sys.argv[2:]
    if rows_file != "-":
        record_rows(rows_file)
    from jaxalign.cli import main

    sys.exit(main(args))
