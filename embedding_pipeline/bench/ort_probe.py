"""Model-only throughput: ONNX Runtime on the model file, no server, no preprocessing.

Runs in the serving environment (which has onnxruntime), as a standalone script: prints one JSON line.
"""

import argparse
import json
import time

import numpy as np
import onnxruntime as ort


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    options = ort.SessionOptions()
    options.intra_op_num_threads = args.threads
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(args.model, options, providers=["CPUExecutionProvider"])
    inp = session.get_inputs()[0]
    shape = [args.batch if not isinstance(d, int) or d < 0 else d for d in inp.shape]
    dtype = np.uint8 if "uint8" in inp.type else np.float32
    batch = np.random.default_rng(0).integers(0, 255, size=shape).astype(dtype)
    session.run(None, {inp.name: batch})  # warm-up
    done, started = 0, time.perf_counter()
    while time.perf_counter() - started < args.seconds:
        session.run(None, {inp.name: batch})
        done += args.batch
    elapsed = time.perf_counter() - started
    print(
        json.dumps(
            {
                "images": done,
                "seconds": elapsed,
                "images_per_s": done / elapsed,
                "batch": args.batch,
                "threads": args.threads,
                "input": inp.name,
                "shape": shape,
            }
        )
    )


if __name__ == "__main__":
    main()
