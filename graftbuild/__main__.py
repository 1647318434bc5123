from graftbuild.cli import main

main()
