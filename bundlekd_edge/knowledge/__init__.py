"""Distillation, teacher side: teacher clients with a call cache, frequent patterns, rules, thoughts.

Imports neither torch nor transformers: a teacher is an HTTP endpoint or a llama.cpp GGUF.
"""

from .cache import CallCache, CallStats
from .teachers import GgufTeacher, HttpTeacher, Reply, Teacher, TeacherConfig, TeacherError, make_teacher

__all__ = [
    "CallCache",
    "CallStats",
    "GgufTeacher",
    "HttpTeacher",
    "Reply",
    "Teacher",
    "TeacherConfig",
    "TeacherError",
    "make_teacher",
]
