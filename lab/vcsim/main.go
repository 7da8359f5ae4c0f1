// vcsim for the lab: govmomi's vCenter simulator (Debian's 0.24.2 ships the library, not the
// binary) with an inventory sized from flags. Prints URL=... and waits for SIGTERM.
package main

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"flag"
	"fmt"
	"log"
	"math/big"
	"net"
	"net/url"
	"os"
	"os/signal"
	"path"
	"strings"
	"syscall"
	"time"

	"github.com/vmware/govmomi/find"
	"github.com/vmware/govmomi/object"
	"github.com/vmware/govmomi/simulator"
	"github.com/vmware/govmomi/simulator/esx"
	"github.com/vmware/govmomi/vim25"
	"github.com/vmware/govmomi/vim25/mo"
	"github.com/vmware/govmomi/vim25/types"
)

// diskFollower makes RelocateVM_Task move disk backings with the VM's datastore, as vCenter does
// (0.24.2 only sets vm.datastore: "TODO: migrate vm.Config.Files"). Registry.Update calls it.
type diskFollower struct{ types.ManagedObjectReference }

func (diskFollower) PutObject(mo.Reference)                    {}
func (diskFollower) RemoveObject(types.ManagedObjectReference) {}
func (diskFollower) UpdateObject(o mo.Reference, changes []types.PropertyChange) {
	vm, ok := o.(*mo.VirtualMachine)
	if !ok || vm.Config == nil {
		return
	}
	for _, c := range changes {
		refs, ok := c.Val.(*types.ArrayOfManagedObjectReference) // Update wraps slices this way
		if c.Name != "datastore" || !ok || len(refs.ManagedObjectReference) != 1 {
			continue
		}
		ds := refs.ManagedObjectReference[0]
		name := simulator.Map.Get(ds).(*simulator.Datastore).Name
		for _, d := range vm.Config.Hardware.Device {
			if disk, ok := d.(*types.VirtualDisk); ok {
				b := disk.Backing.(*types.VirtualDiskFlatVer2BackingInfo)
				b.Datastore = &ds
				b.FileName = fmt.Sprintf("[%s] %s/%s", name, vm.Name, path.Base(b.FileName))
			}
		}
	}
}

func main() {
	m := simulator.VPX()
	flag.IntVar(&m.Datacenter, "dc", 1, "datacenters")
	flag.IntVar(&m.Cluster, "cluster", 1, "clusters per datacenter")
	flag.IntVar(&m.ClusterHost, "host", 3, "hosts per cluster")
	flag.IntVar(&m.Host, "standalone", 1, "standalone hosts per datacenter")
	flag.IntVar(&m.Datastore, "ds", 1, "datastores (every host of a datacenter mounts them all)")
	perHost := flag.Int("vm", 2, "VMs per host (disks spread over the datastores, powered on)")
	var looks vmLooks
	flag.StringVar(&looks.off, "off", "", "VMs whose name matches this pattern (path.Match) stay powered off")
	flag.StringVar(&looks.tools, "tools", "", "VMs whose name matches this pattern report VMware Tools running")
	flag.Var(&looks.disabled, "disable", "PATTERN=Method[,Method]: matching VMs refuse these methods (repeatable)")
	listen := flag.String("listen", "127.0.0.1:0", "address to serve on")
	login := flag.String("login", "user:pass", "the only user:password accepted")
	certFile := flag.String("cert", "", "write the server's TLS certificate (PEM) here")
	relocateDelay := flag.Int("relocate-delay-ms", 0, "delay each RelocateVM_Task call (the move happens after it)")
	flag.Parse()
	for _, pattern := range []string{looks.off, looks.tools} {
		if _, err := path.Match(pattern, ""); err != nil {
			log.Fatalf("bad VM name pattern %q: %s", pattern, err)
		}
	}
	if *relocateDelay > 0 {
		// vcsim runs a task within the call: a delay before it gives a crash test a window in
		// which the client has asked for the move and vCenter has not recorded it yet.
		m.DelayConfig.MethodDelay = map[string]int{"RelocateVM_Task": *relocateDelay}
	}
	m.Machine = 0 // the model puts VMs per cluster at random; we place them per host below
	if err := m.Create(); err != nil {
		log.Fatal(err)
	}
	defer m.Remove()
	shareDatastores()
	if err := addVMs(m.Service, *perHost, looks); err != nil {
		log.Fatal(err)
	}
	simulator.Map.AddHandler(diskFollower{types.ManagedObjectReference{Type: "lab", Value: "disk-follower"}})

	// A login of our own: with simulator.DefaultLogin vcsim accepts any user name and password.
	user, pass, _ := strings.Cut(*login, ":")
	m.Service.Listen = &url.URL{Host: *listen, User: url.UserPassword(user, pass)}
	cert, err := selfSigned(*certFile)
	if err != nil {
		log.Fatal(err)
	}
	m.Service.TLS = &tls.Config{Certificates: []tls.Certificate{cert}}
	s := m.Service.NewServer()
	defer s.Close()
	fmt.Printf("URL=%s\n", s.URL)

	sig := make(chan os.Signal, 1)
	signal.Notify(sig, syscall.SIGTERM, syscall.SIGINT)
	<-sig
}

// shareDatastores lists every host that mounts a datastore in its host mounts: Create() mounts
// each datastore on every host of the datacenter, but 0.24.2 keeps only the last host in ds.host.
func shareDatastores() {
	for _, e := range simulator.Map.All("HostSystem") {
		host := e.(*simulator.HostSystem)
		for _, ref := range host.Datastore {
			ds := simulator.Map.Get(ref).(*simulator.Datastore)
			if len(ds.Host) > 0 && ds.Host[0].Key != host.Self && !hasMount(ds.Host, host.Self) {
				ds.Host = append(ds.Host, types.DatastoreHostMount{Key: host.Self, MountInfo: ds.Host[0].MountInfo})
			}
		}
	}
}

func hasMount(mounts []types.DatastoreHostMount, host types.ManagedObjectReference) bool {
	for _, m := range mounts {
		if m.Key == host {
			return true
		}
	}
	return false
}

// selfSigned makes a P-256 certificate for localhost/127.0.0.1 and writes it (PEM) to certFile so
// clients can verify TLS against it. The simulator's built-in one has a 1024-bit RSA key, which
// OpenSSL 3 refuses ("EE certificate key too weak").
func selfSigned(certFile string) (tls.Certificate, error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return tls.Certificate{}, err
	}
	tmpl := x509.Certificate{
		SerialNumber: big.NewInt(time.Now().UnixNano()), Subject: pkix.Name{CommonName: "vcsim lab"},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().AddDate(1, 0, 0),
		IsCA: true, BasicConstraintsValid: true, DNSNames: []string{"localhost"},
		KeyUsage:    x509.KeyUsageDigitalSignature | x509.KeyUsageCertSign,
		ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
		IPAddresses: []net.IP{net.IPv4(127, 0, 0, 1), net.IPv6loopback},
	}
	der, err := x509.CreateCertificate(rand.Reader, &tmpl, &tmpl, &key.PublicKey, key)
	if err == nil && certFile != "" {
		err = os.WriteFile(certFile, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}), 0o644)
	}
	return tls.Certificate{Certificate: [][]byte{der}, PrivateKey: key}, err
}

// vmLooks gives some VMs a state of their own by name, for tests that need one:
//   - off: left powered off (a cold move's case: it cannot move live);
//   - tools: VMware Tools reported running (guest.toolsRunningStatus guestToolsRunning, toolsStatus
//     toolsOk), so a client may ask ShutdownGuest (0.24.2 powers the VM off at once, whatever Tools
//     say); CreateVM reports Tools not installed and nothing in the simulator changes that;
//   - disabled: methods the VM refuses with MethodDisabled, as vCenter answers for a method that a
//     solution (a backup, say) disabled with AuthorizationManager.DisableMethods, which 0.24.2 lacks:
//     the one way to make a call fail on a VM that is otherwise fine.
type vmLooks struct {
	off, tools string
	disabled   methodRules
}

// methodRules is the repeatable -disable flag: "PATTERN=RelocateVM_Task,PowerOnVM_Task".
type methodRules []methodRule

type methodRule struct {
	pattern string
	methods []string // as 0.24.2 compares them: its Go names, "RelocateVMTask"
}

func (r *methodRules) String() string { return fmt.Sprint(*r) }

func (r *methodRules) Set(value string) error {
	pattern, list, ok := strings.Cut(value, "=")
	if !ok || pattern == "" || list == "" {
		return fmt.Errorf("want PATTERN=Method[,Method], got %q", value)
	}
	if _, err := path.Match(pattern, ""); err != nil {
		return err
	}
	rule := methodRule{pattern: pattern}
	for _, m := range strings.Split(list, ",") {
		// The simulator dispatches "RelocateVM_Task" to its method RelocateVMTask and checks
		// disabledMethod against that name.
		if strings.HasSuffix(m, "_Task") {
			m = strings.TrimSuffix(m, "_Task") + "Task"
		}
		rule.methods = append(rule.methods, m)
	}
	*r = append(*r, rule)
	return nil
}

func matches(pattern, name string) bool {
	ok, _ := path.Match(pattern, name) // patterns were checked when the flags were parsed
	return pattern != "" && ok
}

// apply gives a new VM its looks. It runs before the server starts, so no client watches yet.
func (l vmLooks) apply(ref types.ManagedObjectReference) {
	vm := simulator.Map.Get(ref).(*simulator.VirtualMachine)
	if matches(l.tools, vm.Name) {
		vm.Guest.ToolsRunningStatus = string(types.VirtualMachineToolsRunningStatusGuestToolsRunning)
		vm.Guest.ToolsStatus = types.VirtualMachineToolsStatusToolsOk
		vm.Summary.Guest.ToolsRunningStatus = vm.Guest.ToolsRunningStatus
		vm.Summary.Guest.ToolsStatus = vm.Guest.ToolsStatus
	}
	for _, rule := range l.disabled {
		if matches(rule.pattern, vm.Name) {
			vm.DisabledMethod = append(vm.DisabledMethod, rule.methods...)
		}
	}
}

// addVMs creates perHost VMs on every host, in the host's resource pool, with one 1 MiB disk on
// datastore (i mod n) and an "owner" custom attribute, powered on unless -off names them.
func addVMs(svc *simulator.Service, perHost int, looks vmLooks) error {
	ctx := context.Background()
	c, err := vim25.NewClient(ctx, svc) // in-process: no HTTP, no session needed
	if err != nil {
		return err
	}
	fields := object.NewCustomFieldsManager(c)
	owner, err := fields.Add(ctx, "owner", "VirtualMachine", nil, nil)
	if err != nil {
		return err
	}
	owners := []string{"team-web", "team-data", "team-ops"}
	finder := find.NewFinder(c, false)
	dcs, err := finder.DatacenterList(ctx, "*")
	if err != nil {
		return err
	}
	n := 0
	for _, dc := range dcs {
		finder.SetDatacenter(dc)
		folders, _ := dc.Folders(ctx)
		hosts, _ := finder.HostSystemList(ctx, "*/*")
		stores, err := finder.DatastoreList(ctx, "*")
		if err != nil {
			return err
		}
		for _, host := range hosts {
			pool, err := host.ResourcePool(ctx)
			if err != nil {
				return err
			}
			for i := 0; i < perHost; i++ {
				name := fmt.Sprintf("%s_VM%d", host.Name(), i)
				dir := fmt.Sprintf("[%s]", stores[n%len(stores)].Name())
				var devices object.VirtualDeviceList
				scsi, _ := devices.CreateSCSIController("pvscsi")
				disk := devices.CreateDisk(scsi.(types.BaseVirtualController), types.ManagedObjectReference{},
					dir+" "+path.Join(name, "disk1.vmdk"))
				disk.CapacityInKB = 1024
				nic := esx.EthernetCard
				devices = append(devices, scsi, disk, &nic)
				spec := types.VirtualMachineConfigSpec{Name: name, GuestId: "otherGuest",
					Files: &types.VirtualMachineFileInfo{VmPathName: dir}, NumCPUs: 1, MemoryMB: 64}
				spec.DeviceChange, _ = devices.ConfigSpec(types.VirtualDeviceConfigSpecOperationAdd)
				task, err := folders.VmFolder.CreateVM(ctx, spec, pool, host)
				if err != nil {
					return err
				}
				info, err := task.WaitForResult(ctx, nil)
				if err != nil {
					return err
				}
				vm := object.NewVirtualMachine(c, info.Result.(types.ManagedObjectReference))
				if !matches(looks.off, name) {
					if task, err = vm.PowerOn(ctx); err == nil {
						err = task.Wait(ctx)
					}
				}
				looks.apply(vm.Reference())
				if err == nil {
					err = fields.Set(ctx, vm.Reference(), owner.Key, owners[n%len(owners)])
				}
				if err != nil {
					return err
				}
				n++
			}
		}
	}
	return nil
}
