from graftbuild.cli.entry import main

main()
