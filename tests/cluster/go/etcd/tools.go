//go:build tools

// The command this module exists to build; the blank import lets `go mod tidy` fill go.sum.
package tools

import _ "go.etcd.io/etcd/server/v3"
