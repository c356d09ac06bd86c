"""Cache management over HTTP (filled in below)."""

from fastapi import APIRouter

router = APIRouter()
