// The WebSocket benchmark's Go server (tests/bench/ws.py): gorilla/websocket echoing
// every message, the usual Go stack for it. Built offline from Debian's packages
// (golang-go, golang-github-gorilla-websocket-dev): GO111MODULE=off
// GOPATH=/usr/share/gocode go build -o ws-echo-go ws_echo.go. Usage: ws-echo-go ADDR.
package main

import (
	"net/http"
	"os"

	"github.com/gorilla/websocket"
)

var upgrader = websocket.Upgrader{ReadBufferSize: 4096, WriteBufferSize: 4096}

func echo(w http.ResponseWriter, r *http.Request) {
	c, err := upgrader.Upgrade(w, r, nil)
	if err != nil {
		return
	}
	defer c.Close()
	for {
		kind, message, err := c.ReadMessage()
		if err != nil {
			return
		}
		if err := c.WriteMessage(kind, message); err != nil {
			return
		}
	}
}

func main() {
	http.HandleFunc("/", echo)
	if err := http.ListenAndServe(os.Args[1], nil); err != nil {
		panic(err)
	}
}
