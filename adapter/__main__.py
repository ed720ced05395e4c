"""`python -m adapter` is the `homeward` command."""

from adapter.cli import main

raise SystemExit(main())
