"""The stand-in for TensorFlow Serving behind `python -m tfseg.serving_stub`: a servable, the gRPC
PredictionService and the REST API, answering from the SavedModel's own signatures."""

import base64
import json
import re
import signal
import threading
from concurrent import futures
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import grpc
import numpy as np
import tensorflow as tf
from google.protobuf import json_format
from tensorflow.core.protobuf import saved_model_pb2
from tensorflow_serving.apis import get_model_metadata_pb2, model_pb2, predict_pb2, prediction_service_pb2_grpc

from tfseg import layout
from tfseg.errors import DataError
from tfseg.layout import SIGNATURE
from tfseg.serving.api import GRPC_OPTIONS, reason

REST_PATH = re.compile(r"/v1/models/([^/:]+)(?:/versions/(\d+))?(:predict|/metadata)?")


class RequestError(Exception):
    """A request the server rejects: carries the gRPC status and the HTTP status that go with it."""

    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code, self.message = code, message

    @property
    def http_status(self) -> int:
        return {grpc.StatusCode.NOT_FOUND: 404, grpc.StatusCode.INVALID_ARGUMENT: 400}.get(self.code, 500)


class Servable:
    """The newest version of one SavedModel, answering Predict calls on its signatures."""

    def __init__(self, name: str, base_path: str | Path):
        base = Path(base_path)
        versions = layout.versions(base)
        if not versions:
            raise DataError(f"{base}: no numbered version folder with a saved_model.pb (expected {base}/1/...)")
        self.name, self.version = name, versions[-1]
        self.path = base / str(self.version)
        self.model = tf.saved_model.load(str(self.path))
        saved = saved_model_pb2.SavedModel.FromString((self.path / "saved_model.pb").read_bytes())
        # What TF Serving's GetModelMetadata answers: the SignatureDefs of the serving meta graph.
        self.signature_defs = get_model_metadata_pb2.SignatureDefMap(signature_def=saved.meta_graphs[0].signature_def)

    def check(self, name: str, version: int | None) -> None:
        if name != self.name or (version is not None and version != self.version):
            wanted = f"{name} version {version}" if version is not None else name
            raise RequestError(grpc.StatusCode.NOT_FOUND, f"Servable not found for request: {wanted} "
                                                          f"(serving {self.name} version {self.version})")

    def metadata_json(self) -> dict:
        """GET /v1/models/NAME/metadata's answer, in TF Serving's JSON shape."""
        return {"model_spec": {"name": self.name, "signature_name": "", "version": str(self.version)},
                "metadata": {"signature_def": json_format.MessageToDict(
                    self.signature_defs, preserving_proto_field_name=True, always_print_fields_with_no_presence=True)}}

    def predict(self, signature_name: str, inputs: dict, output_filter=()) -> dict[str, np.ndarray]:
        signature_name = signature_name or SIGNATURE
        if signature_name not in self.model.signatures:
            raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, f"Serving signature name: \"{signature_name}\" "
                               f"not found in signature def (have: {', '.join(self.model.signatures)})")
        fn = self.model.signatures[signature_name]
        specs = fn.structured_input_signature[1]
        if set(inputs) != set(specs):
            raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, f"signature {signature_name} takes inputs "
                               f"{sorted(specs)}, the request has {sorted(inputs)}")
        unknown = set(output_filter) - set(fn.structured_outputs)
        if unknown:
            raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, f"output_filter {sorted(unknown)} not among "
                               f"the outputs {sorted(fn.structured_outputs)}")
        try:
            tensors = {key: tf.constant(value, dtype=specs[key].dtype) for key, value in inputs.items()}
            outputs = fn(**tensors)
        except tf.errors.InvalidArgumentError as err:
            # TF Serving answers the failing op's message (no Python stack); the stub sends its sentence
            raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, reason(err.message)) from None
        except (ValueError, TypeError) as err:
            raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, getattr(err, "message", str(err))) from None
        return {key: value.numpy() for key, value in outputs.items() if not output_filter or key in output_filter}


class PredictionService(prediction_service_pb2_grpc.PredictionServiceServicer):
    def __init__(self, servable: Servable):
        self.servable = servable

    def Predict(self, request, context):  # noqa: N802 (gRPC method name)
        spec = request.model_spec
        try:
            self.servable.check(spec.name, spec.version.value if spec.HasField("version") else None)
            inputs = {key: tf.make_ndarray(proto) for key, proto in request.inputs.items()}
            outputs = self.servable.predict(spec.signature_name, inputs, list(request.output_filter))
        except RequestError as err:
            context.abort(err.code, err.message)
        response = predict_pb2.PredictResponse(model_spec=model_pb2.ModelSpec(
            name=self.servable.name, signature_name=spec.signature_name or SIGNATURE))
        response.model_spec.version.value = self.servable.version
        for key, value in outputs.items():
            response.outputs[key].CopyFrom(tf.make_tensor_proto(value))
        return response


    def GetModelMetadata(self, request, context):  # noqa: N802 (gRPC method name)
        spec = request.model_spec
        try:
            self.servable.check(spec.name, spec.version.value if spec.HasField("version") else None)
            unsupported = [f for f in request.metadata_field if f != "signature_def"]
            if unsupported or not request.metadata_field:
                raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, f"Metadata field {unsupported or ['']} is "
                                   "not supported: ask for metadata_field signature_def")
        except RequestError as err:
            context.abort(err.code, err.message)
        response = get_model_metadata_pb2.GetModelMetadataResponse(
            model_spec=model_pb2.ModelSpec(name=self.servable.name))
        response.model_spec.version.value = self.servable.version
        response.metadata["signature_def"].Pack(self.servable.signature_defs)
        return response


def _from_json(value):
    """JSON request values -> Python values, {"b64": ...} objects -> bytes (TF Serving's convention)."""
    if isinstance(value, dict):
        if set(value) == {"b64"}:
            return base64.b64decode(value["b64"])
        return {key: _from_json(v) for key, v in value.items()}
    if isinstance(value, list):
        return [_from_json(v) for v in value]
    return value


def _to_json(array: np.ndarray):
    if array.dtype == object:
        return np.vectorize(lambda b: {"b64": base64.b64encode(b).decode()}, otypes=[object])(array).tolist()
    return array.tolist()


def rest_predict(servable: Servable, body: dict) -> dict:
    """TF Serving's REST predict: row ("instances") or columnar ("inputs") format, same answer shapes."""
    signature = body.get("signature_name", SIGNATURE)
    specs = servable.model.signatures[signature].structured_input_signature[1] \
        if signature in servable.model.signatures else {}
    if ("instances" in body) == ("inputs" in body):
        raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, 'the request needs exactly one of "instances" or "inputs"')
    if "instances" in body:
        instances = _from_json(body["instances"])
        if not isinstance(instances, list):
            raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, '"instances" must be a list')
        if instances and all(isinstance(row, dict) for row in instances):
            inputs = {key: [row.get(key) for row in instances] for key in instances[0]}
        else:
            inputs = {next(iter(specs), "inputs"): instances}
        outputs = servable.predict(signature, inputs)
        if len(outputs) == 1:
            return {"predictions": _to_json(next(iter(outputs.values())))}
        count = len(next(iter(outputs.values())))
        return {"predictions": [{key: _to_json(value[i]) for key, value in outputs.items()} for i in range(count)]}
    inputs = _from_json(body["inputs"])
    if not isinstance(inputs, dict):
        inputs = {next(iter(specs), "inputs"): inputs}
    outputs = servable.predict(signature, inputs)
    if len(outputs) == 1:
        return {"outputs": _to_json(next(iter(outputs.values())))}
    return {"outputs": {key: _to_json(value) for key, value in outputs.items()}}


def rest_handler(servable: Servable):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def _send(self, status: int, payload: dict) -> None:
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _route(self, *allowed: str | None) -> str | None:
            """The endpoint's suffix (None for the model status, ':predict', '/metadata') if allowed."""
            match = REST_PATH.fullmatch(self.path)
            if not match or match.group(3) not in allowed:
                raise RequestError(grpc.StatusCode.NOT_FOUND, f"no such endpoint: {self.command} {self.path}")
            servable.check(match.group(1), int(match.group(2)) if match.group(2) else None)
            return match.group(3)

        def do_GET(self):  # noqa: N802 (http.server method name)
            try:
                endpoint = self._route(None, "/metadata")
            except RequestError as err:
                return self._send(err.http_status, {"error": err.message})
            if endpoint == "/metadata":
                return self._send(200, servable.metadata_json())
            self._send(200, {"model_version_status": [{"version": str(servable.version), "state": "AVAILABLE",
                                                       "status": {"error_code": "OK", "error_message": ""}}]})

        def do_POST(self):  # noqa: N802 (http.server method name)
            body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
            try:
                self._route(":predict")
                try:
                    request = json.loads(body)
                except ValueError as err:
                    raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, f"request body is not JSON ({err})") from None
                if not isinstance(request, dict):
                    raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, "request body must be a JSON object")
                self._send(200, rest_predict(servable, request))
            except RequestError as err:
                self._send(err.http_status, {"error": err.message})

        def log_message(self, format, *args):  # quiet: one line per request would drown the output
            pass

    return Handler


def serve(model_name: str, model_base_path: str | Path, host: str, port: int, rest_api_port: int) -> None:
    """Serve the newest version under model_base_path over gRPC and REST until SIGTERM."""
    servable = Servable(model_name, model_base_path)

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4), options=GRPC_OPTIONS)
    prediction_service_pb2_grpc.add_PredictionServiceServicer_to_server(PredictionService(servable), server)
    grpc_port = server.add_insecure_port(f"{host}:{port}")
    if not grpc_port:
        raise DataError(f"cannot listen on {host}:{port} for gRPC (port in use?)")
    server.start()
    http = ThreadingHTTPServer((host, rest_api_port), rest_handler(servable))
    threading.Thread(target=http.serve_forever, daemon=True).start()

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    print(f"serving {servable.name} version {servable.version} from {servable.path}: gRPC {host}:{grpc_port}, "
          f"REST http://{host}:{http.server_address[1]} (tfseg stand-in for tensorflow_model_server)",
          flush=True)
    try:
        stop.wait()
    finally:
        http.shutdown()
        server.stop(grace=1).wait()
