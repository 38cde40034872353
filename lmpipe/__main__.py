from lmpipe.cli.main import main

raise SystemExit(main())
