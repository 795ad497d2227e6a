from lowvox.cli import main

raise SystemExit(main())
