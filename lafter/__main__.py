from lafter.cli import main

raise SystemExit(main())
