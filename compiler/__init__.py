"""The scenec compiler: semantic checks, geometry, IR passes, lowering to plans. Never imports torch."""
