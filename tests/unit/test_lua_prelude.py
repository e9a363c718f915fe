"""The Lua prelude refuses a key pattern it could not quote. Lua and Python agreeing, asked of
a real redis-server: tests/store/test_lua_prelude.py."""

from __future__ import annotations

import pytest

from services.scheduler.store import lua


def test_a_pattern_that_lua_could_not_quote_is_refused() -> None:
    with pytest.raises(ValueError, match="quote-free"):
        lua.key_builder("bad", "it's:{id}")
