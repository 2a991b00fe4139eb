from executor.cli.main import main

raise SystemExit(main())
