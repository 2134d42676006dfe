"""What a serving client and server share besides the signature names (tfseg.layout): gRPC options,
and reading TensorFlow's error messages."""

import re

GRPC_OPTIONS = [("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", -1)]


def reason(message: str) -> str:
    """The line of a TensorFlow error message that says what is wrong with the request."""
    lines = [line for line in message.strip().splitlines() if line.strip()]
    asserted = [line for line in lines if "assertion failed" in line]
    if not asserted:
        return (lines[-2:-1] or lines)[0].strip()
    # "assertion failed: [sentence] [data]" (tf.debugging.Assert's wording) -> "sentence data"
    parts = re.findall(r"\[((?:[^\[\]]|\[[^\]]*\])*)\]", asserted[0].split("assertion failed:", 1)[1])
    return " ".join(p.strip() for p in parts).strip() or asserted[0].strip()
