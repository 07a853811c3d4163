from pullthrough.proxy.cli import main

raise SystemExit(main())
