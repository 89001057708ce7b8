from qcore.cli import main

raise SystemExit(main())
