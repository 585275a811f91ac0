from lafter_client.cli import main

raise SystemExit(main())
