from lmpipe.cli import main

raise SystemExit(main())
