"""The generated gRPC modules are what protos/expert.proto generates today."""
from pathlib import Path

from grpc_tools import protoc

REPO = Path(__file__).resolve().parent.parent


def test_generated_modules_are_current(tmp_path):
    (tmp_path / "protos").mkdir()
    (tmp_path / "protos" / "expert.proto").write_bytes((REPO / "protos" / "expert.proto").read_bytes())
    status = protoc.main(["protoc", f"-I{tmp_path}", f"--python_out={tmp_path}", f"--grpc_python_out={tmp_path}",
                          str(tmp_path / "protos" / "expert.proto")])
    assert status == 0
    for name in ("expert_pb2.py", "expert_pb2_grpc.py"):
        assert (tmp_path / "protos" / name).read_text() == (REPO / "protos" / name).read_text(), (
            f"protos/{name} is stale: run python -m grpc_tools.protoc -I. --python_out=. --grpc_python_out=. "
            "protos/expert.proto")
