"""kto-loop: shared configuration and the ``ktoloop`` command line."""
