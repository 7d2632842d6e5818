from proto.nanoplane.v1 import generation_pb2 as _generation_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from typing import ClassVar as _ClassVar, Iterable as _Iterable, Mapping as _Mapping, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ListDataPlanesRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListDataPlanesResponse(_message.Message):
    __slots__ = ("dataplanes",)
    DATAPLANES_FIELD_NUMBER: _ClassVar[int]
    dataplanes: _containers.RepeatedCompositeFieldContainer[_generation_pb2.DataPlaneStatus]
    def __init__(self, dataplanes: _Optional[_Iterable[_Union[_generation_pb2.DataPlaneStatus, _Mapping]]] = ...) -> None: ...

class DrainDataPlaneRequest(_message.Message):
    __slots__ = ("address", "move")
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    MOVE_FIELD_NUMBER: _ClassVar[int]
    address: str
    move: bool
    def __init__(self, address: _Optional[str] = ..., move: bool = ...) -> None: ...

class UndrainDataPlaneRequest(_message.Message):
    __slots__ = ("address",)
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    address: str
    def __init__(self, address: _Optional[str] = ...) -> None: ...

class JoinDataPlaneRequest(_message.Message):
    __slots__ = ("address",)
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    address: str
    def __init__(self, address: _Optional[str] = ...) -> None: ...
