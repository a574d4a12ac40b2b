"""The OpenAI front's way to the model: one Triton gRPC stream per request, over grpc.aio.

tritonclient's asyncio client refuses `triton_*` request parameters, and without
`triton_enable_empty_final_response` Triton does not forward a final flag sent alone (the model
sends one after the last token, or alone when the end token stops a sequence): the client could
not tell that a stream has ended. So the request is built here from tritonclient's own protobuf
messages with that parameter set, and sent on the service's stub; every response then carries
`triton_final_response`, true on the last one. Cancelling the call (the HTTP client went away)
cancels the request in Triton, which the model's scheduler sees and frees the row.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import AsyncIterator

import numpy as np

MAX_MESSAGE = 64 * 1024 * 1024


@dataclass
class Delta:
    """One response of the model: new tokens of one sequence (choice), or the request's end."""

    index: int  # sequence_index: the choice
    ids: list[int]
    text: str
    logprobs: list[float] | None
    num_input: int
    final: bool = False


class ModelError(Exception):
    """An error response of the model (its message names the input and what is valid)."""


def infer_request(model: str, arrays: dict[str, np.ndarray], request_id: str):
    """A ModelInferRequest of `arrays` (each with the leading batch dim of 1), asking for the empty final response."""
    from tritonclient.grpc import service_pb2
    from tritonclient.utils import np_to_triton_dtype, serialize_byte_tensor

    request = service_pb2.ModelInferRequest(model_name=model, id=request_id)
    for name, array in arrays.items():
        request.inputs.add(name=name, datatype=np_to_triton_dtype(array.dtype), shape=list(array.shape))
        if array.dtype == np.object_:
            request.raw_input_contents.append(serialize_byte_tensor(array).item())
        else:
            request.raw_input_contents.append(np.ascontiguousarray(array).tobytes())
    request.parameters["triton_enable_empty_final_response"].bool_param = True
    return request


def delta_of(infer_response) -> Delta:
    """A Delta from one streamed ModelInferResponse, read from its raw outputs (the model's shapes:
    one text_output element, BYTES as a 4-byte length and the bytes; the rest little-endian numbers)."""
    final = infer_response.parameters["triton_final_response"].bool_param
    if not infer_response.outputs:  # the final flag alone
        return Delta(0, [], "", None, 0, final=final)
    raw = dict(zip((o.name for o in infer_response.outputs), infer_response.raw_output_contents))
    text = raw.get("text_output")
    lp = raw.get("output_log_probs")
    index = raw.get("sequence_index")
    return Delta(index=0 if index is None else int(np.frombuffer(index, np.int32)[0]),
                 ids=np.frombuffer(raw["output_ids"], np.int32).tolist(),
                 text="" if text is None else text[4:].decode("utf-8"),
                 logprobs=None if lp is None else np.frombuffer(lp, np.float32).tolist(),
                 num_input=int(np.frombuffer(raw["num_input_tokens"], np.int32)[0]), final=final)


class TritonLink:
    """A gRPC channel to one tritonserver; made inside the event loop that uses it."""

    def __init__(self, url: str):
        import grpc
        from tritonclient.grpc import service_pb2_grpc

        options = [("grpc.max_send_message_length", MAX_MESSAGE), ("grpc.max_receive_message_length", MAX_MESSAGE)]
        self.channel = grpc.aio.insecure_channel(url, options=options)
        self.stub = service_pb2_grpc.GRPCInferenceServiceStub(self.channel)

    async def ready(self, model: str) -> bool:
        """Whether Triton says `model` is ready (False while it starts or if it cannot be reached)."""
        import grpc
        from tritonclient.grpc import service_pb2

        try:
            reply = await self.stub.ModelReady(service_pb2.ModelReadyRequest(name=model), timeout=2)
        except grpc.aio.AioRpcError:
            return False
        return reply.ready

    async def stream(self, model: str, arrays: dict[str, np.ndarray], request_id: str) -> AsyncIterator[Delta]:
        """The model's responses to one request, until its final one; ModelError for an error response.
        Leaving the loop early (or being cancelled) cancels the request in Triton."""
        done = asyncio.Event()

        async def requests():
            yield infer_request(model, arrays, request_id)
            await done.wait()  # keep our half open: the stream ends with the final response

        call = self.stub.ModelStreamInfer(requests())
        finished = False
        try:
            async for response in call:
                if response.error_message:  # an error response is the request's last
                    finished = True
                    raise ModelError(response.error_message)
                delta = delta_of(response.infer_response)
                finished = delta.final
                if delta.ids or delta.text:
                    yield delta
                if finished:
                    return
            raise ModelError("the server closed the stream before the request's final response")
        finally:
            done.set()  # our half closes: a finished call ends by itself
            if not finished:
                call.cancel()  # Triton cancels the request (and the model frees its row)

    async def close(self) -> None:
        await self.channel.close()
