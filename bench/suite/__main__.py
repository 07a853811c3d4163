from bench.suite.main import main

raise SystemExit(main())
