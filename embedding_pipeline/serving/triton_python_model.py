"""Triton python-backend model that runs ``model.onnx`` (next to this file) with ONNX Runtime.

Copied verbatim into the model repository as ``<model>/1/model.py``; Triton imports it in its backend stub
process (the ``serving`` environment), so it may import only numpy, onnxruntime and Triton's own utilities —
never ``embedding_pipeline``. The bundled Triton has only the python backend; for NVIDIA's Triton containers the
``onnxruntime`` repository flavour serves the same ``model.onnx`` with their ONNX Runtime backend instead (see
:mod:`embedding_pipeline.serving.repository`).

Tensor names, types and shapes come from ``config.pbtxt``; ORT thread counts from its ``parameters``
(``intra_op_num_threads``, ``inter_op_num_threads``).
"""

import json
import os

import numpy as np
import onnxruntime as ort
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        params = {key: value.get("string_value", "") for key, value in config.get("parameters", {}).items()}
        options = ort.SessionOptions()
        options.intra_op_num_threads = int(params.get("intra_op_num_threads") or 2)
        options.inter_op_num_threads = int(params.get("inter_op_num_threads") or 1)
        model_file = os.path.join(args["model_repository"], args["model_version"], "model.onnx")
        self.session = ort.InferenceSession(model_file, sess_options=options, providers=["CPUExecutionProvider"])
        self.inputs = [item["name"] for item in config["input"]]
        self.outputs = [(item["name"], pb_utils.triton_string_to_numpy(item["data_type"])) for item in config["output"]]
        self.batched = int(config.get("max_batch_size", 0)) > 0

    def execute(self, requests):
        feeds = []
        responses = [None] * len(requests)
        for index, request in enumerate(requests):
            try:
                feeds.append((index, self._feed(request)))
            except Exception as exc:  # noqa: BLE001 - reported to that request's caller
                responses[index] = _error(f"bad request: {exc}")
        if feeds:
            for index, response in self._run_all(feeds):
                responses[index] = response
        return responses

    def _feed(self, request):
        feed = {}
        for name in self.inputs:
            tensor = pb_utils.get_input_tensor_by_name(request, name)
            if tensor is None:
                raise ValueError(f"missing input {name!r}")
            feed[name] = tensor.as_numpy()
        return feed

    def _run_all(self, feeds):
        """One ORT run for all requests when their shapes allow (dynamic batching's point), else one each."""
        if len(feeds) > 1 and self.batched and _stackable([feed for _, feed in feeds]):
            sizes = [len(feed[self.inputs[0]]) for _, feed in feeds]
            merged = {name: np.concatenate([feed[name] for _, feed in feeds]) for name in self.inputs}
            try:
                results = self._run(merged)
            except Exception:  # noqa: BLE001 - retry one by one so only the faulty request fails
                results = None
            if results is not None:
                bounds = np.cumsum([0] + sizes)
                return [
                    (index, self._response([r[bounds[i] : bounds[i + 1]] for r in results]))
                    for i, (index, _) in enumerate(feeds)
                ]
        out = []
        for index, feed in feeds:
            try:
                out.append((index, self._response(self._run(feed))))
            except Exception as exc:  # noqa: BLE001 - reported to that request's caller
                out.append((index, _error(f"inference failed: {exc}")))
        return out

    def _run(self, feed):
        return self.session.run([name for name, _ in self.outputs], feed)

    def _response(self, results):
        tensors = [
            pb_utils.Tensor(name, np.ascontiguousarray(value, dtype=dtype))
            for (name, dtype), value in zip(self.outputs, results)
        ]
        return pb_utils.InferenceResponse(output_tensors=tensors)

    def finalize(self):
        self.session = None


def _stackable(feeds):
    first = feeds[0]
    return all(
        feed[name].shape[1:] == first[name].shape[1:] and feed[name].dtype == first[name].dtype
        for feed in feeds[1:]
        for name in first
    ) and all(len({len(array) for array in feed.values()}) == 1 for feed in feeds)


def _error(message):
    return pb_utils.InferenceResponse(output_tensors=[], error=pb_utils.TritonError(message))
